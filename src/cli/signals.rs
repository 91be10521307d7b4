//! Signals, handled at the edge: an interrupt removes the unfinished output
//! files of this process that already have a (hidden) name before it exits,
//! so Ctrl-C never leaves a temporary file behind (see `staged` for what
//! SIGKILL can leave, and who removes it).

use std::sync::atomic::{AtomicI32, Ordering};

/// The signals that end the process after cleaning up.
const INTERRUPTS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Write end of the pipe from the signal handler to the watcher thread.
static PIPE: AtomicI32 = AtomicI32::new(-1);

/// The handler only writes the signal's number into the pipe (write(2) is
/// async-signal-safe; taking a lock or removing files here is not).
extern "C" fn on_interrupt(sig: libc::c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) of one byte from a live local.
    unsafe { libc::write(PIPE.load(Ordering::Relaxed), (&raw const byte).cast(), 1) };
}

/// Called first in `main`. A watcher thread waits on a pipe; the handler of
/// SIGINT, SIGTERM and SIGHUP wakes it, and it removes this process's
/// temporary output files, says so, and exits with 128 + the signal number.
/// A handler, not a blocked mask and `sigwait`, because libraries start
/// threads before `main` (OpenBLAS does), and those would keep the default
/// action. A signal that was ignored when we started (a background job's
/// SIGINT, `nohup`'s SIGHUP) stays ignored.
///
/// Also: SIGXFSZ is ignored, so a file-size limit (`ulimit -f`) turns into a
/// write error that is reported and cleaned up like a full disk instead of
/// killing the process; SIGPIPE gets its default action back (Rust ignores
/// it), so `time-onnx inspect … | head` ends quietly instead of panicking on
/// a closed stdout.
pub fn install() {
    // SAFETY: plain libc calls on initialized locals; the handler installed
    // is async-signal-safe (see `on_interrupt`).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut fds = [0; 2];
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return; // keep the default actions
        }
        let read_end = fds[0];
        let watcher = move || {
            let mut byte = 0u8;
            while libc::read(read_end, (&raw mut byte).cast(), 1) != 1 {}
            time_onnx::staged::abandon_all();
            let name = match libc::c_int::from(byte) {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            let msg = format!("\nerror: interrupted by {name}; unfinished output files removed\n");
            // No destructors or atexit handlers while other threads are
            // still inside ONNX Runtime.
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(128 + libc::c_int::from(byte));
        };
        if std::thread::Builder::new()
            .name("signals".into())
            .spawn(watcher)
            .is_err()
        {
            return;
        }
        PIPE.store(fds[1], Ordering::Relaxed);
        for sig in INTERRUPTS {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Gives SIGINT, SIGTERM and SIGHUP their default actions back, for a
/// command that handles them itself (`serve` drains its requests on SIGTERM
/// instead of exiting at once; its files are unnamed until complete, so an
/// interrupt leaves none behind).
pub fn leave_interrupts_to_command() {
    for sig in INTERRUPTS {
        // SAFETY: restoring a default action.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if old.sa_sigaction != libc::SIG_IGN {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}
