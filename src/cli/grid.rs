//! `time-onnx grid`: tile images into one, e.g. the same seeds before and after an edit.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use time_onnx::pipeline::label::{Captions, caption};
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
    /// A caption drawn left of a row (repeatable: one per row, in order), e.g. "a circle, before".
    #[arg(long = "row-label", value_name = "TEXT")]
    row_labels: Vec<String>,
    /// A heading drawn above the columns (repeatable: each over an equal share of them).
    #[arg(long = "heading", value_name = "TEXT")]
    headings: Vec<String>,
    /// Output PNG.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: GridArgs) -> anyhow::Result<()> {
    let GridArgs {
        images,
        cols,
        scale,
        row_labels,
        headings,
        output,
    } = args;
    let rows = images.len().div_ceil(cols.max(1));
    if !row_labels.is_empty() && row_labels.len() != rows {
        bail!(
            "--row-label: {} given for {rows} rows of {cols} images; give one per row",
            row_labels.len()
        );
    }
    if !headings.is_empty() && cols % headings.len() != 0 {
        bail!(
            "--heading: {} given over {cols} columns; each needs an equal share of them",
            headings.len()
        );
    }
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
    let (h, w, _) = loaded[0].dim();
    let captions = Captions {
        rows: row_labels,
        headings,
    };
    let tiled = caption(&tiled, (h, w), cols, 4, &captions);
    write_png(&output, tiled.view(), &[])
        .with_context(|| format!("writing {}", output.display()))?;
    println!("{}", output.display());
    Ok(())
}
