//! `vma-decode`: what the binary does, as a library.
//!
//! * [`extract`] — an archive into a directory of sparse raw images and
//!   config files, named as Proxmox's `vma extract` names them.
//! * Listing and config dumps are thin: see `vma_cli::listing` and
//!   [`vma_format::VmaHeader::config`].

pub mod extract;
