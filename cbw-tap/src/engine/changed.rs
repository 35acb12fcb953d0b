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
    /// state that does not fit `images` (the reason, for the log) — the
    /// next backup is full. `Ok(Some(()))`: sets and base restored.
    pub fn load(
        &self,
        dir: &Path,
        names: &[String],
        images: &[fs::File],
    ) -> Result<Option<()>, String> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        fs::remove_file(&path).map_err(|e| format!("{}: cannot remove: {e}", path.display()))?;
        let bad = |why: String| format!("{}: {why}", path.display());
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a state file: {e}")))?;
        if state.version != 1 {
            return Err(bad(format!("unknown version {}", state.version)));
        }
        if state.exports.len() != names.len() {
            return Err(bad(format!(
                "{} exports saved, {} served",
                state.exports.len(),
                names.len()
            )));
        }
        let mut sets = Vec::new();
        for ((ex, name), (file, &clusters)) in state
            .exports
            .iter()
            .zip(names)
            .zip(images.iter().zip(&self.clusters))
        {
            if &ex.name != name {
                return Err(bad(format!("export {:?} saved, {name:?} served", ex.name)));
            }
            let now = Binding::of(file).map_err(|e| bad(e.to_string()))?;
            if now != ex.binding {
                return Err(bad(format!(
                    "the image of export {name:?} changed while it was not served ({})",
                    ex.binding.difference(&now)
                )));
            }
            let mut set = ClusterSet::new(clusters);
            for &[s, e] in &ex.changed {
                if s >= e || e > clusters {
                    return Err(bad(format!("export {name:?}: bad range {s}..{e}")));
                }
                set.insert_range(s..e);
            }
            sets.push(set);
        }
        let uuid = unhex16(&state.base_uuid).ok_or_else(|| bad("bad base uuid".into()))?;
        for (slot, set) in self.sets.iter().zip(sets) {
            *lock(slot) = set;
        }
        *lock(&self.base) = Some(BaseRef {
            uuid,
            time: state.base_time,
        });
        Ok(Some(()))
    }
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
