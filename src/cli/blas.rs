//! OpenBLAS's kernels: the ones this CPU can run, even where OpenBLAS does
//! not know the CPU.
//!
//! OpenBLAS (which ndarray-linalg links) picks its kernels once, while the
//! library loads, from the CPU's model number. A release older than the CPU
//! does not know it and falls back to its generic "Prescott" kernels (SSE3):
//! Debian 12's OpenBLAS 0.3.21 does so on Intel's family 6 model 207 (Emerald
//! Rapids), an AVX-512 machine this workplace lends, where an SD 1.4 edit's
//! apply took ~400 ms instead of ~100 ms and its solve ~60 instead of ~27.
//! OpenBLAS's documented way out, `OPENBLAS_CORETYPE`, is also read only while
//! it loads, so the command runs itself again with it set, before doing
//! anything else.

use std::ffi::{CStr, c_char};
use std::os::unix::process::CommandExt;

/// The variable OpenBLAS reads its kernels' name from, at load.
const CORETYPE: &str = "OPENBLAS_CORETYPE";

unsafe extern "C" {
    /// The name of the kernels OpenBLAS chose ("SkylakeX", "Prescott", …).
    fn openblas_get_corename() -> *const c_char;
}

/// The kernels OpenBLAS runs on.
fn core_name() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string of
    // OpenBLAS (a string literal in every build), never null.
    unsafe { CStr::from_ptr(openblas_get_corename()) }
        .to_string_lossy()
        .into_owned()
}

/// What the CPU's vector units can run, as far as OpenBLAS's kernels care.
#[derive(Clone, Copy, Debug)]
struct Vectors {
    /// AVX2 and FMA (Haswell's kernels).
    avx2: bool,
    /// AVX-512 F, CD, BW, DQ and VL (SkylakeX's kernels).
    avx512: bool,
}

#[cfg(target_arch = "x86_64")]
fn vectors() -> Vectors {
    use std::arch::is_x86_feature_detected as has;
    // The macro also asks the OS whether it saves the registers (XCR0).
    Vectors {
        avx2: has!("avx2") && has!("fma"),
        avx512: has!("avx512f")
            && has!("avx512cd")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vectors() -> Vectors {
    Vectors {
        avx2: false,
        avx512: false,
    }
}

/// The kernels to ask for instead of `chosen`, if any: only OpenBLAS's
/// fallback for CPUs it does not know is replaced (any other choice is
/// OpenBLAS's informed one), by the widest kernels the CPU runs.
fn better_core(chosen: &str, cpu: Vectors) -> Option<&'static str> {
    if !chosen.eq_ignore_ascii_case("prescott") {
        return None;
    }
    if cpu.avx512 {
        Some("SkylakeX")
    } else if cpu.avx2 {
        Some("Haswell")
    } else {
        None
    }
}

/// Runs this command again with `OPENBLAS_CORETYPE` set when OpenBLAS fell
/// back to generic kernels on a CPU with AVX2 or AVX-512; does nothing when
/// the variable is set already (by the user, or by the first run, so there is
/// never a second re-run) or OpenBLAS chose for itself. Call first in `main`:
/// nothing done before it is kept. If the re-run cannot start, this run goes
/// on with the generic kernels: slower, the same results to a few ulps.
pub fn use_the_cpus_kernels() {
    if std::env::var_os(CORETYPE).is_some() {
        return;
    }
    let Some(core) = better_core(&core_name(), vectors()) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(name) = args.next() {
        again.arg0(name);
    }
    // exec only returns on failure; then this run carries on.
    let _ = again.args(args).env(CORETYPE, core).exec();
}

/// One line on the linear algebra in use, for `doctor`.
pub fn describe() -> String {
    let core = core_name();
    match std::env::var(CORETYPE) {
        Ok(asked) => format!("OpenBLAS, {core} kernels ({CORETYPE}={asked})"),
        Err(_) => format!("OpenBLAS, {core} kernels (its own choice for this CPU)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Vectors = Vectors {
        avx2: true,
        avx512: true,
    };
    const AVX2: Vectors = Vectors {
        avx2: true,
        avx512: false,
    };
    const NONE: Vectors = Vectors {
        avx2: false,
        avx512: false,
    };

    #[test]
    fn only_the_generic_fallback_is_replaced_by_the_widest_kernels_the_cpu_runs() {
        assert_eq!(better_core("Prescott", ALL), Some("SkylakeX"));
        assert_eq!(better_core("PRESCOTT", AVX2), Some("Haswell"));
        assert_eq!(better_core("Prescott", NONE), None);
        // OpenBLAS's own choices stand, even narrower ones.
        assert_eq!(better_core("Haswell", ALL), None);
        assert_eq!(better_core("SkylakeX", ALL), None);
        assert_eq!(better_core("Zen", ALL), None);
    }
}
