//! `vma-decode`: what the binary does, as a library.
//!
//! * [`extract`] — an archive into a directory of sparse raw images and
//!   config files, named as Proxmox's `vma extract` names them, or with a
//!   restore map onto target files and block devices.
//! * [`outdir`] — the output directory: files created relative to its
//!   descriptor, never through a link, placed only when all are complete.
//! * [`proxmox`] — Proxmox's `vma` command line, when called as `vma`.
//! * [`restore_map`] — the map `qmrestore` writes for `-r`.
//! * [`stdout`] — one disk to standard output, in order.
//! * [`target`] — writing one device into a file or block device.
//! * [`serve`] — every device as a read-only NBD export, through an
//!   [`index`] of the archive ([`archive_export`] is the NBD backend;
//!   [`cache`] decompresses an archive that cannot be read at random).
//! * Listing and config dumps are thin: see `vma_cli::listing` and
//!   [`vma_format::VmaHeader::config`].

pub mod archive_export;
pub mod cache;
pub mod cli;
pub mod extract;
pub mod index;
pub mod json;
pub mod outdir;
pub mod proxmox;
pub mod restore_map;
pub mod serve;
pub mod stdout;
pub mod target;
