//! SIGINT, SIGTERM and SIGHUP: remove the partial outputs, exit 128+signal.
//!
//! A tool calls [`install`] once at the start of `main`; from then on the
//! three signals no longer kill it outright. Whatever writes a temporary or
//! partial file registers it for as long as it exists in that state —
//! [`remove_on_signal`] for a path, [`remove_on_signal_at`] for a name in a
//! directory opened as a file descriptor (`openat`-style code) — and drops the
//! returned [`Registration`] once the file is final (after the rename) or
//! gone. When a signal comes, a thread of signal-hook's removes every file
//! still registered, prints one line (`TOOL: interrupted by SIGTERM: removed
//! 1 partial output`), and exits with 128 + the signal number (130, 143,
//! 129), the status a shell reports for a process the signal killed.
//!
//! The registry is locked while the handler works, so nothing is registered
//! or renamed half-way through the cleanup. Without [`install`] (in tests,
//! in other programs using the libraries) registering costs a lock and
//! nothing happens on a signal.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Once};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What to remove.
enum Target {
    Path(PathBuf),
    At(Arc<OwnedFd>, OsString),
}

struct Registry {
    next: u64,
    entries: Vec<(u64, Target)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    entries: Vec::new(),
});
static INSTALL: Once = Once::new();
/// Held by [`critical`] sections and by the cleanup, so a cleanup never
/// runs half-way through a group of renames.
static CRITICAL: Mutex<()> = Mutex::new(());

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file to remove on a signal; dropping it (or [`Registration::done`])
/// takes the file off the list — it does not remove the file.
#[must_use = "dropping the registration takes the file off the list at once"]
#[derive(Debug)]
pub struct Registration {
    id: u64,
}

impl Registration {
    /// The file is final or gone: take it off the list.
    pub fn done(self) {}
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().entries.retain(|(id, _)| *id != self.id);
    }
}

fn register(target: Target) -> Registration {
    let mut r = registry();
    r.next += 1;
    let id = r.next;
    r.entries.push((id, target));
    Registration { id }
}

/// Removes `path` if a signal comes before the registration is dropped.
pub fn remove_on_signal(path: impl Into<PathBuf>) -> Registration {
    register(Target::Path(path.into()))
}

/// Removes `name` inside the directory `dir` (with `unlinkat`, so a
/// directory renamed meanwhile is still the right one) if a signal comes
/// before the registration is dropped.
pub fn remove_on_signal_at(dir: Arc<OwnedFd>, name: impl Into<OsString>) -> Registration {
    register(Target::At(dir, name.into()))
}

/// Holds off the cleanup of a signal until the returned guard is dropped,
/// for steps that must not be cut in the middle: renaming a set of files to
/// their final names and moving their registrations with them. A signal
/// that comes meanwhile is acted on when the guard is dropped, against the
/// registrations as they are then. Registering and dropping registrations
/// stays possible while the guard is held.
pub fn critical() -> MutexGuard<'static, ()> {
    CRITICAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Files registered now (for tests).
pub fn registered() -> usize {
    registry().entries.len()
}

/// Takes SIGINT, SIGTERM and SIGHUP over for `tool` (its name in the line
/// printed): see the module documentation. Only the first call counts.
/// Fails only if the signal thread cannot be started.
pub fn install(tool: &'static str) -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = Signals::new([SIGINT, SIGTERM, SIGHUP]).and_then(|mut signals| {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        cleanup_and_exit(tool, sig);
                    }
                })
                .map(drop)
        });
    });
    result
}

/// Removes every registered file, says so, exits 128 + `sig`.
fn cleanup_and_exit(tool: &str, sig: i32) -> ! {
    // Both held until the process exits: no critical section is under way
    // and nothing is registered or dropped meanwhile.
    let _critical = critical();
    let r = registry();
    let mut removed = 0;
    for (_, target) in &r.entries {
        let ok = match target {
            Target::Path(p) => std::fs::remove_file(p).is_ok(),
            Target::At(dir, name) => {
                rustix::fs::unlinkat(dir, name.as_os_str(), rustix::fs::AtFlags::empty()).is_ok()
            }
        };
        removed += ok as usize;
    }
    let name = match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    let what = if removed == 1 { "output" } else { "outputs" };
    eprintln!("{tool}: interrupted by {name}: removed {removed} partial {what}");
    std::process::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_and_go() {
        let before = registered();
        let a = remove_on_signal("/nonexistent/a");
        let b = remove_on_signal("/nonexistent/b");
        assert!(registered() >= before + 2);
        a.done();
        drop(b);
        // Other tests of this binary may register concurrently; ours are gone.
        assert!(registry()
            .entries
            .iter()
            .all(|(_, t)| !matches!(t, Target::Path(p) if p.starts_with("/nonexistent"))));
    }
}
