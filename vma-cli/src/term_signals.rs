//! Waiting for SIGINT, SIGTERM or SIGHUP in a server, without a signal
//! handler: block them in every thread (the mask is inherited by threads
//! started later) and take them with `sigwait` in one place, so a server
//! stops cleanly (sockets removed, exit 0) however it is told to.

/// The termination signals, blocked.
pub struct TermSignals {
    set: libc::sigset_t,
}

impl TermSignals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread. Call it
    /// before starting any thread, so that every thread inherits the mask.
    pub fn block() -> TermSignals {
        // SAFETY: sigemptyset/sigaddset initialise the set we own;
        // pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            TermSignals { set }
        }
    }

    /// Waits for one of them and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: the set was initialised in `block`; `sig` is a valid out
        // pointer.
        unsafe { while libc::sigwait(&self.set, &mut sig) != 0 {} }
        sig
    }
}

// SAFETY: a sigset_t is plain data; sigwait only reads it.
unsafe impl Send for TermSignals {}

/// The usual name of signal `sig`, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
