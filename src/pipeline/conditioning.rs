//! What the UNet reads besides the noisy sample and the timestep, and how
//! each is made.
//!
//! SD 1.x/2.x UNets read the text only as `encoder_hidden_states`. SDXL's
//! also read the second text encoder's pooled embedding (`text_embeds`) and
//! the image's size conditioning (`time_ids`), through an added embedding
//! that never meets the cross-attention K/V weights, so an edit leaves both
//! alone. LCM-distilled UNets take the guidance scale as an embedding
//! (`timestep_cond`) instead of running an unconditional half. All of them
//! are the same at every denoising step, so they are bound once per batch
//! beside the text ([`crate::pipeline::unet::Unet::bind`]).

use ndarray::{Array2, Array3};

use crate::onnx::Model;

/// The UNet's pooled text input (SDXL).
pub const TEXT_EMBEDS: &str = "text_embeds";
/// The UNet's size-conditioning input (SDXL).
pub const TIME_IDS: &str = "time_ids";
/// The UNet's guidance-embedding input (LCM-distilled UNets).
pub const TIMESTEP_COND: &str = "timestep_cond";

/// The inputs a UNet export declares beyond `sample`, `timestep` and
/// `encoder_hidden_states`, with their widths when the export fixes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnetInputs {
    /// `encoder_hidden_states`' width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL).
    pub context_width: Option<usize>,
    /// `text_embeds`: `Some(width)` when present (width `None` if dynamic).
    pub text_embeds: Option<Option<usize>>,
    /// `time_ids`: `Some(width)` when present.
    pub time_ids: Option<Option<usize>>,
    /// `timestep_cond`: `Some(width)` when present.
    pub timestep_cond: Option<Option<usize>>,
}

/// Why a UNet's extra inputs do not fit the rest of the folder.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConditioningError {
    /// An SDXL refiner (5-wide `time_ids`: sizes and an aesthetic score).
    #[error(
        "the UNet takes {width}-wide time_ids: an SDXL refiner (aesthetic-score conditioning, image \
         to image), which time-onnx does not support; it takes 6-wide time_ids (SDXL base, Turbo, \
         LCM)"
    )]
    Refiner {
        /// The declared width.
        width: usize,
    },
    /// `time_ids` of a width no pipeline makes.
    #[error(
        "the UNet takes {width}-wide time_ids; SDXL's are 6 wide (original size, crop, target size)"
    )]
    TimeIdsWidth {
        /// The declared width.
        width: usize,
    },
    /// One of SDXL's added inputs without the other.
    #[error("the UNet takes {has} but not {missing}: SDXL UNets take both")]
    HalfAdded {
        /// The input it has.
        has: &'static str,
        /// The one it lacks.
        missing: &'static str,
    },
    /// Two text encoders but a UNet that reads no pooled embedding.
    #[error(
        "the folder has two text encoders (SDXL) but the UNet has no input \"text_embeds\" for the \
         pooled embedding: the UNet is not an SDXL UNet"
    )]
    NoPooledInput,
    /// A UNet that reads a pooled embedding, but one text encoder.
    #[error(
        "the UNet takes \"text_embeds\" (an SDXL UNet) but the folder has one text encoder: SDXL \
         needs text_encoder_2/ and tokenizer_2/"
    )]
    NoPooledOutput,
    /// The encoders' pooled width is not what the UNet reads.
    #[error(
        "the UNet takes {unet}-wide text_embeds but the second text encoder's pooled output is {encoder} wide"
    )]
    PooledWidth {
        /// What the UNet takes.
        unet: usize,
        /// What the encoder gives.
        encoder: usize,
    },
    /// The guidance embedding's width is unknown.
    #[error(
        "the UNet takes timestep_cond (an LCM-distilled UNet) but neither its export nor \
         unet/config.json (time_cond_proj_dim) gives the embedding's width"
    )]
    GuidanceWidth,
}

impl UnetInputs {
    /// Reads the graph inputs of a UNet file.
    pub fn of(model: &Model) -> Self {
        let width = |name: &str| {
            model
                .input_dims(name)
                .map(|d| d.get(1).copied().flatten().filter(|_| d.len() == 2))
        };
        Self {
            context_width: model
                .input_dims("encoder_hidden_states")
                .and_then(|d| d.last().copied().flatten()),
            text_embeds: width(TEXT_EMBEDS),
            time_ids: width(TIME_IDS),
            timestep_cond: width(TIMESTEP_COND),
        }
    }

    /// Checks the added inputs against the text side (`pooled`: whether the
    /// encoders give a pooled embedding, SDXL's) and against each other.
    pub fn check(&self, pooled: bool) -> Result<(), ConditioningError> {
        match (self.text_embeds, self.time_ids) {
            (Some(_), None) => {
                return Err(ConditioningError::HalfAdded {
                    has: TEXT_EMBEDS,
                    missing: TIME_IDS,
                });
            }
            (None, Some(_)) => {
                return Err(ConditioningError::HalfAdded {
                    has: TIME_IDS,
                    missing: TEXT_EMBEDS,
                });
            }
            _ => {}
        }
        match self.time_ids.flatten() {
            Some(5) => return Err(ConditioningError::Refiner { width: 5 }),
            Some(w) if w != TIME_IDS_WIDTH => {
                return Err(ConditioningError::TimeIdsWidth { width: w });
            }
            _ => {}
        }
        match (pooled, self.text_embeds.is_some()) {
            (true, false) => Err(ConditioningError::NoPooledInput),
            (false, true) => Err(ConditioningError::NoPooledOutput),
            _ => Ok(()),
        }
    }
}

/// SDXL's `time_ids` width: original (h, w), crop top-left (y, x), target (h, w).
pub const TIME_IDS_WIDTH: usize = 6;

/// diffusers' `add_time_ids` for an image of `height`×`width` pixels, as its
/// SDXL pipeline makes them by default: original size = target size = the
/// image's, crop at (0, 0).
pub fn time_ids(height: usize, width: usize) -> [f32; TIME_IDS_WIDTH] {
    let (h, w) = (height as f32, width as f32);
    [h, w, 0.0, 0.0, h, w]
}

/// The guidance embedding of an LCM-distilled UNet for guidance scale `g`:
/// diffusers' `get_guidance_scale_embedding(g − 1, dim)`, in float32 as it
/// computes it: w = 1000·(g − 1), fᵢ = exp(−i·ln(10000)/(dim/2 − 1)),
/// [sin(w·fᵢ) …, cos(w·fᵢ) …], a zero appended when `dim` is odd.
pub fn guidance_embedding(guidance: f64, dim: usize) -> Vec<f32> {
    let w = (guidance - 1.0) as f32 * 1000.0;
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut out: Vec<f32> = args.iter().map(|a| a.sin()).collect();
    out.extend(args.iter().map(|a| a.cos()));
    out.resize(dim, 0.0);
    out
}

/// The rows of one UNet batch, the same at every step: the text context and
/// whatever else the UNet reads.
#[derive(Clone, Debug)]
pub struct TextBatch {
    /// `encoder_hidden_states`: `[b, 77, d] f32`.
    pub hidden: Array3<f32>,
    /// SDXL's `text_embeds`: `[b, p] f32`.
    pub text_embeds: Option<Array2<f32>>,
    /// SDXL's `time_ids`: `[b, 6] f32`.
    pub time_ids: Option<Array2<f32>>,
    /// LCM's `timestep_cond`: `[b, c] f32`.
    pub timestep_cond: Option<Array2<f32>>,
}

impl TextBatch {
    /// The inputs besides `encoder_hidden_states`, by name, that are set.
    pub fn extras(&self) -> impl Iterator<Item = (&'static str, &Array2<f32>)> {
        [
            (TEXT_EMBEDS, &self.text_embeds),
            (TIME_IDS, &self.time_ids),
            (TIMESTEP_COND, &self.timestep_cond),
        ]
        .into_iter()
        .filter_map(|(n, a)| a.as_ref().map(|a| (n, a)))
    }
}

/// `row` repeated `rows` times: `[rows, row.len()] f32`.
pub fn repeat_row(row: &[f32], rows: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, row.len()), |(_, j)| row[j])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_are_size_crop_size() {
        assert_eq!(
            time_ids(1024, 768),
            [1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]
        );
    }

    #[test]
    fn the_guidance_embedding_of_one_is_sines_of_zero_and_cosines_of_zero() {
        let e = guidance_embedding(1.0, 7);
        assert_eq!(e, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    }

    fn inputs(te: Option<usize>, ti: Option<usize>) -> UnetInputs {
        UnetInputs {
            context_width: Some(2048),
            text_embeds: te.map(Some),
            time_ids: ti.map(Some),
            timestep_cond: None,
        }
    }

    #[test]
    fn sdxl_inputs_must_come_together_and_fit_the_text_side() {
        assert_eq!(inputs(Some(1280), Some(6)).check(true), Ok(()));
        assert_eq!(inputs(None, None).check(false), Ok(()));
        assert_eq!(
            inputs(Some(1280), Some(5)).check(true),
            Err(ConditioningError::Refiner { width: 5 })
        );
        assert_eq!(
            inputs(Some(1280), None).check(true),
            Err(ConditioningError::HalfAdded {
                has: TEXT_EMBEDS,
                missing: TIME_IDS
            })
        );
        assert_eq!(
            inputs(None, None).check(true),
            Err(ConditioningError::NoPooledInput)
        );
        assert_eq!(
            inputs(Some(1280), Some(6)).check(false),
            Err(ConditioningError::NoPooledOutput)
        );
    }
}
