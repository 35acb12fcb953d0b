//! SIGINT, SIGTERM and SIGHUP: how every tool of the project takes them.
//!
//! Two ways, one per kind of tool; a process uses one of them, never both
//! (the second one asked for panics: they would fight over the signals).
//!
//! * **Tools that write outputs** (extract, encode) call [`install`] once at
//!   the start of `main`; from then on the three signals no longer kill them
//!   outright. Whatever writes a temporary or partial file registers it for
//!   as long as it exists in that state — [`remove_on_signal`] for a path,
//!   [`remove_on_signal_at`] for a name in a directory opened as a file
//!   descriptor (`openat`-style code) — and drops the returned
//!   [`Registration`] once the file is final (after the rename) or gone.
//!   When a signal comes, a thread of signal-hook's removes every file still
//!   registered, prints one line (`TOOL: interrupted by SIGTERM: removed 1
//!   partial output`), and exits with 128 + the signal number (130, 143,
//!   129), the status a shell reports for a process the signal killed.
//! * **Servers** (`cbw-tap serve`, `vma-decode serve`) block the signals
//!   with [`TermSignals::block`] before starting any thread and take them
//!   with [`TermSignals::wait`] in one place of their own, with no handler
//!   at all: a signal is then a request to stop cleanly (sockets removed,
//!   exit 0). A server that gets one before it serves (while it prepares)
//!   and has nothing to stop calls [`exit_removing_partials`]: the files it
//!   registered meanwhile (a half-written index) go as with [`install`].
//!
//! The registry is locked while the cleanup works, so nothing is registered
//! or renamed half-way through it. Without either (in tests, in other
//! programs using the libraries) registering costs a lock and nothing
//! happens on a signal.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
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
/// Which way this process takes the signals: [`UNCLAIMED`], [`CLEANUP`]
/// ([`install`]) or [`SERVER`] ([`TermSignals::block`]).
static CLAIMED: AtomicU8 = AtomicU8::new(UNCLAIMED);
const UNCLAIMED: u8 = 0;
const CLEANUP: u8 = 1;
const SERVER: u8 = 2;

/// Records that the process takes the signals the `way` given; panics if
/// it already takes them the other way (a bug of the tool, not of input).
fn claim(way: u8) {
    match CLAIMED.compare_exchange(UNCLAIMED, way, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => {}
        Err(had) if had == way => {}
        Err(_) => panic!(
            "signals: a process takes SIGINT/SIGTERM/SIGHUP either with install() \
             (remove partial outputs and exit) or with TermSignals (a server), not both"
        ),
    }
}
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
///
/// # Panics
/// In a process that called [`TermSignals::block`].
pub fn install(tool: &'static str) -> std::io::Result<()> {
    claim(CLEANUP);
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = Signals::new([SIGINT, SIGTERM, SIGHUP]).and_then(|mut signals| {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        exit_removing_partials(tool, sig);
                    }
                })
                .map(drop)
        });
    });
    result
}

/// Removes every registered file, says so (`TOOL: interrupted by SIGTERM:
/// removed 1 partial output`), exits 128 + `sig`. What [`install`]'s thread
/// does on a signal; a server calls it for a signal that comes before it
/// serves. Waits for a [`critical`] section under way to end.
pub fn exit_removing_partials(tool: &str, sig: i32) -> ! {
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
    let what = if removed == 1 { "output" } else { "outputs" };
    eprintln!(
        "{tool}: interrupted by {}: removed {removed} partial {what}",
        signal_name(sig)
    );
    std::process::exit(128 + sig)
}

/// The usual name of signal `sig` (`SIGTERM`), for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// SIGINT, SIGTERM and SIGHUP blocked, for a server to wait for.
pub struct TermSignals {
    set: libc::sigset_t,
}

impl TermSignals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread. Call it
    /// before starting any thread, so that every thread inherits the mask
    /// and the signals reach no thread but the one in [`wait`](Self::wait).
    ///
    /// # Panics
    /// In a process that called [`install`].
    #[allow(unsafe_code)]
    pub fn block() -> TermSignals {
        claim(SERVER);
        // SAFETY: sigemptyset/sigaddset initialise the set we own;
        // pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            TermSignals { set }
        }
    }

    /// Waits for one of them and returns its number.
    #[allow(unsafe_code)]
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: the set was initialised in `block`; `sig` is a valid out
        // pointer.
        unsafe { while libc::sigwait(&self.set, &mut sig) != 0 {} }
        sig
    }
}

// SAFETY: a sigset_t is plain data; sigwait only reads it.
#[allow(unsafe_code)]
unsafe impl Send for TermSignals {}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_hook::consts::SIGUSR1;

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

    #[test]
    fn a_process_takes_the_signals_one_way_only() {
        // No test here calls install() or TermSignals::block(): claim alone.
        claim(SERVER);
        claim(SERVER);
        let other = std::panic::catch_unwind(|| claim(CLEANUP));
        CLAIMED.store(UNCLAIMED, Ordering::SeqCst);
        assert!(
            other.is_err(),
            "install() after TermSignals::block() must panic"
        );
        claim(CLEANUP);
        let other = std::panic::catch_unwind(|| claim(SERVER));
        CLAIMED.store(UNCLAIMED, Ordering::SeqCst);
        assert!(
            other.is_err(),
            "TermSignals::block() after install() must panic"
        );
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(SIGINT), "SIGINT");
        assert_eq!(signal_name(SIGTERM), "SIGTERM");
        assert_eq!(signal_name(SIGHUP), "SIGHUP");
        assert_eq!(signal_name(SIGUSR1), "a signal");
    }
}
