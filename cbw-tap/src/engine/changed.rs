//! Changed-cluster tracking: which clusters of each export guests wrote
//! (WRITE, WRITE_ZEROES, TRIM) since the last completed backup, so that an
//! incremental backup reads only those.
//!
//! Every write records its clusters while it holds the gate shared, so the
//! backup instant (the gate held exclusively) cuts the record exactly: the
//! sets are swapped for empty ones there, the old sets say what the new
//! backup must capture. The *base* (uuid and instant of the last completed
//! backup) is taken away at the instant too, and given back — as the new
//! backup's identity — only when that backup's stream was finished. So a
//! failed backup makes the next one full.
//!
//! Memory follows what changed: one [`ClusterSet`] per export (a few bytes
//! per run of written clusters).
//!
//! # The state file
//!
//! With `serve --state-dir DIR`, a clean shutdown saves the sets and the
//! base to `DIR/cbw-tap.state` (JSON), bound to each image by export name,
//! size, device and inode, and modification time. `serve` reads the file at
//! start and removes it at once: after a `kill -9` (or any stop that did
//! not save) there is no file, and the next backup is full. A file that
//! does not match the images (another image, a size or mtime changed while
//! cbw-tap was not serving it) is discarded with a log line: the next
//! backup is full.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nbd_server::sync::lock;
use serde::{Deserialize, Serialize};
use vma_format::clusterset::ClusterSet;
use vma_format::identity::BaseRef;

use super::CS;
use crate::control::{hex, unhex16};

/// Name of the state file inside `--state-dir`.
pub const STATE_FILE: &str = "cbw-tap.state";

/// The changed clusters of every export and the base they are relative to.
pub struct Changes {
    sets: Vec<Mutex<ClusterSet>>,
    clusters: Vec<u64>,
    base: Mutex<Option<BaseRef>>,
    /// Takes so far (see [`Changes::generation`]).
    takes: std::sync::atomic::AtomicU64,
}

impl Changes {
    /// Nothing changed, no base (the first backup is full).
    pub(super) fn new(clusters: Vec<u64>) -> Changes {
        Changes {
            sets: clusters
                .iter()
                .map(|&c| Mutex::new(ClusterSet::new(c)))
                .collect(),
            clusters,
            base: Mutex::new(None),
            takes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records a guest write to `offset..offset + len` of export `index`
    /// (`len > 0`, inside the export). Call with the gate held shared.
    pub(super) fn record(&self, index: usize, offset: u64, len: u64) {
        let first = offset / CS;
        let last = (offset + len - 1) / CS;
        let mut set = lock(&self.sets[index]);
        if first == last && set.contains(first) {
            return;
        }
        set.insert_range(first..last + 1);
    }

    /// At the instant (gate held exclusively): the sets so far and the base
    /// they are relative to; recording starts afresh and there is no base
    /// until [`completed`](Self::completed).
    pub(super) fn take(&self) -> (Vec<ClusterSet>, Option<BaseRef>) {
        self.takes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let sets = self
            .sets
            .iter()
            .zip(&self.clusters)
            .map(|(s, &c)| std::mem::replace(&mut *lock(s), ClusterSet::new(c)))
            .collect();
        (sets, lock(&self.base).take())
    }

    /// How many times [`take`](Self::take) was called: a backup's
    /// instant is the `generation()` just after its take.
    pub(super) fn generation(&self) -> u64 {
        self.takes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The backup whose take was `generation` finished its stream (and,
    /// if asked, its consumer succeeded): it is the base of the next
    /// incremental backup — if no take came since (false then).
    pub(super) fn completed(&self, base: BaseRef, generation: u64) -> bool {
        let mut b = lock(&self.base);
        if self.generation() != generation {
            return false;
        }
        *b = Some(base);
        true
    }

    /// The base of the next incremental backup, if there is one.
    pub fn base(&self) -> Option<BaseRef> {
        *lock(&self.base)
    }

    /// Clusters of export `index` written since the base (or since serving
    /// began).
    pub fn changed_count(&self, index: usize) -> u64 {
        lock(&self.sets[index]).count()
    }

    /// Forgets the base: the next backup is full.
    pub fn invalidate(&self) {
        *lock(&self.base) = None;
    }

    /// Saves the sets and base to `dir`'s state file, bound to `images`
    /// (one open image per export, in order); with no base, removes the
    /// file instead (nothing worth saving). Call when no guest write can
    /// come any more.
    pub fn save(&self, dir: &Path, names: &[String], images: &[fs::File]) -> io::Result<()> {
        let path = dir.join(STATE_FILE);
        let Some(base) = self.base() else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        };
        let mut exports = Vec::new();
        for (i, (name, file)) in names.iter().zip(images).enumerate() {
            let set = lock(&self.sets[i]);
            let mut changed = Vec::new();
            let mut pos = 0;
            for gap in set.missing() {
                if gap.start > pos {
                    changed.push([pos, gap.start]);
                }
                pos = gap.end;
            }
            if pos < set.clusters() {
                changed.push([pos, set.clusters()]);
            }
            exports.push(ExportState {
                name: name.clone(),
                binding: Binding::of(file)?,
                changed,
            });
        }
        let state = StateFile {
            version: 1,
            base_uuid: hex(&base.uuid),
            base_time: base.time,
            exports,
        };
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&state).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    }

    /// Loads `dir`'s state file and removes it (so that a stop without
    /// saving means a full backup next). `Ok(None)`: no file. `Err`: a
    /// state that cannot be read or does not fit `images` (for the log) —
    /// the next backup is full. `Ok(Some(()))`: sets and base restored.
    pub fn load(
        &self,
        dir: &Path,
        names: &[String],
        images: &[fs::File],
    ) -> Result<Option<()>, StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if let Err(source) = fs::remove_file(&path) {
            return Err(StateError::Remove { path, source });
        }
        self.restore(&bytes, names, images)
            .map(Some)
            .map_err(|problem| StateError::Unfit { path, problem })
    }

    /// Restores the sets and the base from a state file's `bytes`, if they
    /// fit the images served now.
    fn restore(
        &self,
        bytes: &[u8],
        names: &[String],
        images: &[fs::File],
    ) -> Result<(), StateProblem> {
        let state: StateFile = serde_json::from_slice(bytes).map_err(StateProblem::NotJson)?;
        if state.version != 1 {
            return Err(StateProblem::Version(state.version));
        }
        if state.exports.len() != names.len() {
            return Err(StateProblem::ExportCount {
                saved: state.exports.len(),
                served: names.len(),
            });
        }
        let mut sets = Vec::new();
        for ((ex, name), (file, &clusters)) in state
            .exports
            .iter()
            .zip(names)
            .zip(images.iter().zip(&self.clusters))
        {
            if &ex.name != name {
                return Err(StateProblem::ExportName {
                    saved: ex.name.clone(),
                    served: name.clone(),
                });
            }
            let now = Binding::of(file).map_err(StateProblem::Image)?;
            if now != ex.binding {
                return Err(StateProblem::Changed {
                    name: name.clone(),
                    difference: ex.binding.difference(&now),
                });
            }
            let mut set = ClusterSet::new(clusters);
            for &[start, end] in &ex.changed {
                if start >= end || end > clusters {
                    return Err(StateProblem::BadRange {
                        name: name.clone(),
                        start,
                        end,
                    });
                }
                set.insert_range(start..end);
            }
            sets.push(set);
        }
        let uuid = unhex16(&state.base_uuid).ok_or(StateProblem::BaseUuid)?;
        for (slot, set) in self.sets.iter().zip(sets) {
            *lock(slot) = set;
        }
        *lock(&self.base) = Some(BaseRef {
            uuid,
            time: state.base_time,
        });
        Ok(())
    }
}

/// Why a saved state is not used ([`Changes::load`]): the next backup is full.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It cannot be removed (so it could be used twice: it is not used).
    #[error("{}: cannot remove: {source}", path.display())]
    Remove {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It was read, but does not fit what is served now.
    #[error("{}: {problem}", path.display())]
    Unfit {
        /// The state file.
        path: PathBuf,
        /// What does not fit.
        problem: StateProblem,
    },
}

/// What is wrong with a state file's content.
#[derive(Debug, thiserror::Error)]
pub enum StateProblem {
    /// Not the JSON of a state file.
    #[error("not a state file: {0}")]
    NotJson(serde_json::Error),
    /// A version other than 1.
    #[error("unknown version {0}")]
    Version(u32),
    /// Another number of exports than served now.
    #[error("{saved} exports saved, {served} served")]
    ExportCount {
        /// Exports in the file.
        saved: usize,
        /// Exports served.
        served: usize,
    },
    /// An export of another name (or in another order) than served now.
    #[error("export {saved:?} saved, {served:?} served")]
    ExportName {
        /// The name in the file.
        saved: String,
        /// The name served at that position.
        served: String,
    },
    /// An image's metadata cannot be read.
    #[error("{0}")]
    Image(io::Error),
    /// An image is not the one saved, or was modified since.
    #[error("the image of export {name:?} changed while it was not served ({difference})")]
    Changed {
        /// The export.
        name: String,
        /// What differs (size, file, modification time), then and now.
        difference: String,
    },
    /// A changed range that is empty or runs past the image's clusters.
    #[error("export {name:?}: bad range {start}..{end}")]
    BadRange {
        /// The export.
        name: String,
        /// First cluster of the range.
        start: u64,
        /// Cluster past its end.
        end: u64,
    },
    /// The base uuid is not 32 hex digits.
    #[error("bad base uuid")]
    BaseUuid,
}

/// What binds a saved state to an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Binding {
    size: u64,
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl Binding {
    fn of(file: &fs::File) -> io::Result<Binding> {
        let m = file.metadata()?;
        let size = if m.file_type().is_file() {
            m.len()
        } else {
            // A block device: its size is where it ends.
            use std::io::Seek;
            let mut f = file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(Binding {
            size,
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }

    fn difference(&self, now: &Binding) -> String {
        if self.size != now.size {
            format!("size {} then, {} now", self.size, now.size)
        } else if (self.dev, self.ino) != (now.dev, now.ino) {
            "another file".into()
        } else {
            "modified since".into()
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ExportState {
    name: String,
    binding: Binding,
    changed: Vec<[u64; 2]>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    base_uuid: String,
    base_time: i64,
    exports: Vec<ExportState>,
}

/// The state directory's file, for messages.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}
