//! `time-onnx grid`: tile images into one, e.g. the same seeds before and after an edit.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use time_onnx::pipeline::png::{grid, read_png, upscale, write_png};

/// Arguments of `grid`.
#[derive(Debug, Args)]
pub struct GridArgs {
    /// PNG images of equal size, row by row.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Images per row.
    #[arg(long, default_value_t = 4)]
    cols: usize,
    /// Enlarge every image this many times (nearest neighbour), e.g. for 32-pixel images.
    #[arg(long, default_value_t = 1)]
    scale: usize,
    /// Output PNG.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: GridArgs) -> anyhow::Result<()> {
    let GridArgs {
        images,
        cols,
        scale,
        output,
    } = args;
    let loaded = images
        .iter()
        .map(|p| {
            let img = read_png(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(upscale(img.view(), scale))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(tiled) = grid(&loaded, cols, 4) else {
        bail!("the images must all have the same size, and --cols must be at least 1");
    };
    write_png(&output, tiled.view(), &[])
        .with_context(|| format!("writing {}", output.display()))?;
    println!("{}", output.display());
    Ok(())
}
