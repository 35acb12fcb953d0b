//! Locks that ignore poisoning, for every crate of the workspace that
//! shares state between threads.
//!
//! A mutex is poisoned when a thread panicked while holding it. The data
//! these crates protect stays consistent across such a panic (every update
//! is a single assignment or is undone by a guard), and a server must go on
//! serving its other clients, so a poisoned lock is used as it is rather
//! than turning one panic into a panic of every thread that touches it.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Locks `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cond` with `guard`, poisoned or not.
pub fn wait<'a, T>(cond: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cond.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cond` with `guard` for at most `timeout`, poisoned or not;
/// `true` in the second field if the time ran out.
pub fn wait_timeout<'a, T>(
    cond: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    let (g, t) = cond
        .wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner());
    (g, t.timed_out())
}

/// Waits on `cond` with `guard` while `condition` holds, for at most
/// `timeout`, poisoned or not.
pub fn wait_timeout_while<'a, T>(
    cond: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
    condition: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    cond.wait_timeout_while(guard, timeout, condition)
        .unwrap_or_else(|e| e.into_inner())
        .0
}

/// Takes `l` shared, poisoned or not.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Takes `l` exclusively, poisoned or not.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
