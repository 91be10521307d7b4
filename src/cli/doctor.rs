//! `time-onnx doctor`: which ONNX Runtime is used, whether CUDA works, and
//! which linear algebra kernels the edits run on.

use time_onnx::runtime::Runtime;

pub fn run() -> anyhow::Result<()> {
    let rt = Runtime::load()?;
    println!("library: {}", rt.library().display());
    println!("{}", rt.build_info());
    let cuda = match rt.cuda_in_build() {
        Ok(false) => {
            "not in this build of ONNX Runtime (scripts/setup.sh --cuda installs the GPU build)"
                .to_string()
        }
        Err(e) => format!("cannot tell: {e}"),
        Ok(true) => match rt.cuda_check() {
            Ok(()) => "available".to_string(),
            Err(e) => format!("in this build, but it does not start: {e}"),
        },
    };
    println!("CUDA execution provider: {cuda}");
    println!("linear algebra: {}", super::blas::describe());
    Ok(())
}
