//! `cbw-tap`: live, point-in-time backups of disks in use, by
//! copy-before-write over NBD.
//!
//! [`serve::Tap`] serves disk images to a VM (or any NBD client) through
//! the `nbd-server` crate, each export backed by a [`CbwBackend`]: the image
//! with copy-before-write in front of its writes. On request over the
//! control socket ([`control`]) it takes a backup of all exports at one
//! instant and streams it as a cluster stream (`vma_format::stream`) that
//! `vma-encode -` packs into a VMA archive.
//!
//! The engine ([`engine`]) is the heart: the gate that defines the instant,
//! the per-cluster copy states ([`states`]), guest writes copying old data
//! before they land, the background reader, and the bounded queue
//! ([`queue`]) towards the stream writer. Its module documentation lists the
//! locks and why the result is exactly the disks' content at the instant.

pub mod cli;
pub mod control;
pub mod cpus;
pub mod engine;
pub mod lock;
pub mod output;
pub mod pace;
pub mod queue;
pub mod serve;
pub mod sink;
pub mod size;
pub mod states;
pub mod stats;

pub use engine::{
    Aborted, Backup, BackupOptions, BeginError, CaptureSink, CbwBackend, Engine, Policy, MIN_BUFFER,
};
pub use stats::Stats;
