//! CLIP's image preprocessing as transformers' `CLIPImageProcessor` does it:
//! 8-bit RGB, shortest side resized with PIL's bicubic filter, center crop,
//! rescale, normalise. The resize reproduces PIL's fixed-point algorithm so
//! that pixel values agree with the reference exactly.

use std::path::Path;

use ndarray::{Array2, Array3, ArrayView3};
use serde::Deserialize;

/// `preprocessor_config.json` of a `CLIPImageProcessor`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipImageConfig {
    /// `{"shortest_edge": n}` (or `{"height", "width"}`).
    #[serde(default)]
    pub size: SizeSpec,
    /// Center crop size.
    #[serde(default)]
    pub crop_size: Option<CropSpec>,
    /// Per-channel mean.
    #[serde(default = "clip_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel std.
    #[serde(default = "clip_std")]
    pub image_std: [f32; 3],
    /// Multiplies the 8-bit values.
    #[serde(default = "rescale")]
    pub rescale_factor: f32,
    /// Whether to resize.
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// Whether to crop.
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    /// Whether to rescale.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Whether to normalise.
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// PIL resample filter; only 3 (bicubic) is implemented.
    #[serde(default = "bicubic")]
    pub resample: u32,
}

/// How the resize target is given.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SizeSpec {
    /// Resize so the shorter side has this length.
    pub shortest_edge: Option<usize>,
    /// Exact height.
    pub height: Option<usize>,
    /// Exact width.
    pub width: Option<usize>,
}

/// Crop size.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct CropSpec {
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

fn clip_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn clip_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}
fn rescale() -> f32 {
    1.0 / 255.0
}
fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}

/// Why a preprocessor config is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct ClipImageError {
    /// The config file.
    pub path: std::path::PathBuf,
    /// What is wrong.
    pub why: String,
}

impl ClipImageConfig {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ClipImageError> {
        let err = |why: String| ClipImageError {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if cfg.resample != 3 {
            return Err(err(format!(
                "resample filter {} is not supported (only 3, bicubic)",
                cfg.resample
            )));
        }
        Ok(cfg)
    }

    /// Turns `image: [h, w, 3] f32` in [0, 1] into CLIP's input `[3, ch, cw] f32`.
    ///
    /// Like diffusers' `numpy_to_pil`, pixels first become 8-bit with numpy's
    /// rounding (half to even).
    pub fn preprocess(&self, image: ArrayView3<f32>) -> Array3<f32> {
        let (h, w, _) = image.dim();
        let mut px: Array3<u8> =
            image.mapv(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8);
        if self.do_resize {
            let (th, tw) = match (&self.size.shortest_edge, self.size.height, self.size.width) {
                (Some(s), _, _) => {
                    // transformers: the short side becomes s, the long one int(s·long/short).
                    if h <= w {
                        (*s, (*s as f64 * w as f64 / h as f64) as usize)
                    } else {
                        ((*s as f64 * h as f64 / w as f64) as usize, *s)
                    }
                }
                (None, Some(hh), Some(ww)) => (hh, ww),
                _ => (h, w),
            };
            px = resize_bicubic(px.view(), th, tw);
        }
        if self.do_center_crop
            && let Some(c) = self.crop_size
        {
            let (h, w, _) = px.dim();
            let top = h.saturating_sub(c.height) / 2;
            let left = w.saturating_sub(c.width) / 2;
            px = px
                .slice(ndarray::s![
                    top..(top + c.height).min(h),
                    left..(left + c.width).min(w),
                    ..
                ])
                .to_owned();
        }
        let (h, w, _) = px.dim();
        Array3::from_shape_fn((3, h, w), |(c, y, x)| {
            let mut v = f32::from(px[[y, x, c]]);
            if self.do_rescale {
                v *= self.rescale_factor;
            }
            if self.do_normalize {
                v = (v - self.image_mean[c]) / self.image_std[c];
            }
            v
        })
    }
}

/// PIL's bicubic resize of an 8-bit RGB image (`Image.resize(..., BICUBIC)`,
/// no reducing gap): a horizontal then a vertical pass of a cubic kernel
/// (a = −0.5) widened by the downscale factor, with 22-bit fixed-point weights
/// and rounding to 8 bits after each pass.
pub fn resize_bicubic(img: ArrayView3<u8>, out_h: usize, out_w: usize) -> Array3<u8> {
    let (h, w, c) = img.dim();
    let mut tmp = img.to_owned();
    if out_w != w {
        let (bounds, k) = coefficients(w, out_w);
        tmp = Array3::from_shape_fn((h, out_w, c), |(y, x, ch)| {
            let (start, len) = bounds[x];
            convolve((0..len).map(|i| (img[[y, start + i, ch]], k[[x, i]])))
        });
    }
    if out_h != h {
        let src = tmp.clone();
        let (bounds, k) = coefficients(h, out_h);
        tmp = Array3::from_shape_fn((out_h, src.dim().1, c), |(y, x, ch)| {
            let (start, len) = bounds[y];
            convolve((0..len).map(|i| (src[[start + i, x, ch]], k[[y, i]])))
        });
    }
    tmp
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn convolve(taps: impl Iterator<Item = (u8, i32)>) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (v, k) in taps {
        acc += i64::from(v) * i64::from(k);
    }
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: (first input index, tap count) and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Array2<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = Array2::<i32>::zeros((out_size, ksize));
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let weights: Vec<f64> = (0..xmax)
            .map(|x| cubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = weights.iter().sum();
        for (i, wgt) in weights.iter().enumerate() {
            let v = if total != 0.0 { wgt / total } else { *wgt };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            k[[xx, i]] = if fixed < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    (bounds, k)
}
