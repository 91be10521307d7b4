//! The noise schedule shared by every scheduler: betas, ᾱ, σ and the
//! timestep spacings, written once.
//!
//! diffusers builds these with a mix of float32 torch and float64 numpy, and
//! the goldens (1e-5 relative) see the difference, so each function says which
//! precision it reproduces:
//! - betas are float32 (`torch.linspace(..., dtype=float32)`);
//! - ᾱ = cumprod(1 − β) is float32 per element, accumulated in float64 (torch's
//!   CPU `cumprod` accumulates float in double and rounds each output);
//! - σ(t) = √((1 − ᾱ)/ᾱ) is evaluated in float32 on the training grid, then
//!   interpolated linearly in float64 (`np.interp`) and rounded to float32;
//! - timesteps follow numpy's `linspace`/`arange`/`round` (round half to even).
//!
//! Everything is returned as `f64` holding the values diffusers holds, so the
//! schedulers do their scalar maths in `f64` and only the tensor updates in
//! `f32`.

use super::{SchedulerError, Settings};

/// How betas grow over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `"linear"`: β evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// `"scaled_linear"`: √β evenly spaced, then squared (Stable Diffusion).
    ScaledLinear,
    /// `"squaredcos_cap_v2"`: the cosine schedule of Nichol & Dhariwal, with
    /// β capped at 0.999.
    SquaredcosCapV2,
}

/// Where the betas come from: a named schedule or the config's own list.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSource {
    /// `beta_schedule` with `beta_start` and `beta_end`.
    Schedule {
        /// The curve.
        schedule: BetaSchedule,
        /// First β (ignored by `squaredcos_cap_v2`).
        start: f64,
        /// Last β (ignored by `squaredcos_cap_v2`).
        end: f64,
    },
    /// `trained_betas`: one β per training timestep, used as float32.
    Trained(Vec<f64>),
}

/// How inference timesteps are picked among the training ones
/// (`timestep_spacing`, Table 2 of Lin et al. 2023, "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `"leading"`: `arange(N)·(T//N)` reversed, plus `steps_offset`.
    Leading,
    /// `"linspace"`: `linspace(0, T−1, N)` reversed.
    Linspace,
    /// `"trailing"`: `round(arange(T, 0, −T/N)) − 1`.
    Trailing,
}

/// `num_train_timesteps` betas as diffusers computes them (float32).
///
/// `linear` and `scaled_linear` follow torch's CPU `linspace` for float32
/// (step `(end − start)/(n − 1)` in float32, the first half counted from
/// `start`, the second half from `end`); `squaredcos_cap_v2` is computed in
/// float64 like diffusers' Python loop, then rounded. Fails on a `trained_betas`
/// list of the wrong length and on any β outside [0, 1), for which ᾱ is not a
/// probability.
pub fn betas(source: &BetaSource, num_train_timesteps: usize) -> Result<Vec<f32>, SchedulerError> {
    let betas: Vec<f32> = match source {
        BetaSource::Trained(values) => {
            if values.len() != num_train_timesteps {
                return Err(SchedulerError::TrainedBetasLength {
                    expected: num_train_timesteps,
                    actual: values.len(),
                });
            }
            values.iter().map(|&b| b as f32).collect()
        }
        BetaSource::Schedule {
            schedule: BetaSchedule::Linear,
            start,
            end,
        } => torch_linspace_f32(*start, *end, num_train_timesteps),
        BetaSource::Schedule {
            schedule: BetaSchedule::ScaledLinear,
            start,
            end,
        } => torch_linspace_f32(start.sqrt(), end.sqrt(), num_train_timesteps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSource::Schedule {
            schedule: BetaSchedule::SquaredcosCapV2,
            ..
        } => squaredcos_cap_v2(num_train_timesteps),
    };
    match betas
        .iter()
        .position(|b| !b.is_finite() || *b < 0.0 || *b >= 1.0)
    {
        Some(index) => Err(SchedulerError::InvalidBeta {
            index,
            value: f64::from(betas[index]),
        }),
        None => Ok(betas),
    }
}

/// torch's float32 CPU `linspace(start, end, n)`.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n)` with the cosine ᾱ(t) =
/// cos²((t + 0.008)/1.008 · π/2), in float64 (a real division, not candle's
/// integer one), capped at 0.999.
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// ᾱ = cumprod(1 − β): float32 values, products accumulated in float64 as
/// torch's CPU `cumprod` does.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1):
/// shifts and scales √ᾱ so that the last timestep has zero signal, then turns
/// it back into betas. float32 like the torch original; the last β becomes 1.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_ac: Vec<f32> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_ac.first(), sqrt_ac.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    let ac: Vec<f32> = sqrt_ac
        .iter()
        .map(|&s| {
            let s = (s - last) * scale;
            s * s
        })
        .collect();
    std::iter::once(ac[0])
        .chain(ac.windows(2).map(|w| w[1] / w[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}

/// σ = √((1 − ᾱ)/ᾱ) per training timestep, float32 like diffusers' torch
/// expression; index = training timestep (ascending σ).
pub fn sigmas_from_alphas_cumprod(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.interp(x, arange(len(table)), table)`: linear interpolation at a
/// fractional timestep, in float64, clamped to the end values outside the
/// table (which `leading` spacing with `steps_offset` can reach at T).
pub fn interp(x: f64, table: &[f32]) -> f64 {
    let Some(&last) = table.last() else {
        return f64::NAN;
    };
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    let hi = (table.len() - 1) as f64;
    if x >= hi {
        return f64::from(last);
    }
    let j = x.floor() as usize;
    let (a, b) = (f64::from(table[j]), f64::from(table[j + 1]));
    (b - a) * (x - j as f64) + a
}

/// The noise levels one scheduler works with, built from [`Settings`].
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// ᾱ per training timestep (float32 values, as diffusers holds them).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// ᾱ for the schedulers that index it directly (PNDM, DDIM): after a
    /// zero-terminal-SNR rescale the last ᾱ is exactly 0, as in diffusers' DDIM.
    pub fn for_alphas(settings: &Settings) -> Result<Self, SchedulerError> {
        let mut betas = betas(&settings.betas, settings.num_train_timesteps)?;
        if settings.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        Ok(Self {
            alphas_cumprod: alphas_cumprod(&betas),
        })
    }

    /// ᾱ for the σ-parameterised schedulers (Euler, Euler ancestral, LMS,
    /// DPM-Solver): after a zero-terminal-SNR rescale diffusers sets the last ᾱ
    /// to 2⁻²⁴ so that σ stays finite (≈ 4096).
    pub fn for_sigmas(settings: &Settings) -> Result<Self, SchedulerError> {
        let mut schedule = Self::for_alphas(settings)?;
        if settings.rescale_betas_zero_snr
            && let Some(last) = schedule.alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        Ok(schedule)
    }

    /// Number of training timesteps T.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether there are no training timesteps (never, once built from
    /// validated [`Settings`]).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// ᾱ at an integer training timestep, or an error naming it when it lies
    /// outside [0, T) (reachable with `steps_offset`).
    pub fn alpha_cumprod(&self, timestep: i64) -> Result<f64, SchedulerError> {
        usize::try_from(timestep)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t))
            .map(|&a| f64::from(a))
            .ok_or(SchedulerError::TimestepOutOfRange {
                timestep,
                num_train_timesteps: self.len(),
            })
    }

    /// σ per training timestep (float32, ascending).
    pub fn train_sigmas(&self) -> Vec<f32> {
        sigmas_from_alphas_cumprod(&self.alphas_cumprod)
    }
}

/// numpy's float `arange(start, stop, step)`: length ⌈(stop − start)/step⌉,
/// element i = start + i·(x₁ − x₀) where x₁ = start + step (numpy's fill rule).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len.is_finite() && len > 0.0) {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| start + i as f64 * delta)
        .collect()
}

/// numpy's `linspace(start, stop, num)` (endpoint included): i·step + start,
/// the last element exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// Inference timesteps in call order (descending), as diffusers' DDIM, PNDM,
/// Euler, Euler ancestral and LMS `set_timesteps` pick them, before any
/// scheduler-specific rounding or casting: `linspace` values are fractional
/// (PNDM and DDIM round them half-to-even, the σ schedulers keep them as
/// float32); `leading` and `trailing` values are whole numbers.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let t = num_train_timesteps as f64;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, t - 1.0, steps);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (num_train_timesteps / steps.max(1)) as f64;
            (0..steps)
                .rev()
                .map(|i| i as f64 * ratio + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t, 0.0, -(t / steps as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    }
}

/// The integer timesteps of PNDM and DDIM in call order (descending): the
/// spacing's values, `linspace`'s rounded half to even.
pub fn integer_timesteps(settings: &Settings, steps: usize) -> Vec<i64> {
    spaced_timesteps(
        settings.timestep_spacing,
        settings.num_train_timesteps,
        steps,
        settings.steps_offset,
    )
    .into_iter()
    .map(|t| match settings.timestep_spacing {
        TimestepSpacing::Linspace => t.round_ties_even() as i64,
        TimestepSpacing::Leading | TimestepSpacing::Trailing => t as i64,
    })
    .collect()
}

impl NoiseSchedule {
    /// (ᾱ at `t`, ᾱ at `prev`) for each step from `t` to `prev`, where a
    /// `prev` below 0 means past the last timestep: ᾱ₀, or 1 with
    /// `set_alpha_to_one` (PNDM's and DDIM's `final_alpha_cumprod`).
    pub fn alpha_pairs(
        &self,
        settings: &Settings,
        steps: impl Iterator<Item = (i64, i64)>,
    ) -> Result<Vec<(f64, f64)>, SchedulerError> {
        steps
            .map(|(t, prev)| {
                let a_t = self.alpha_cumprod(t)?;
                let a_prev = if prev >= 0 {
                    self.alpha_cumprod(prev)?
                } else if settings.set_alpha_to_one {
                    1.0
                } else {
                    self.alpha_cumprod(0)?
                };
                Ok((a_t, a_prev))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_the_notes() {
        let lead = spaced_timesteps(TimestepSpacing::Leading, 1000, 10, 1);
        assert_eq!(lead[0], 901.0);
        assert_eq!(lead[9], 1.0);
        let lin = spaced_timesteps(TimestepSpacing::Linspace, 1000, 3, 1);
        assert_eq!(lin, vec![999.0, 499.5, 0.0]);
        let trail = spaced_timesteps(TimestepSpacing::Trailing, 1000, 3, 1);
        assert_eq!(trail, vec![999.0, 666.0, 332.0]);
    }

    #[test]
    fn interp_is_exact_at_integers_and_linear_between() {
        let table = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(1.0, &table), 3.0);
        assert_eq!(interp(1.5, &table), 5.0);
        assert_eq!(interp(-1.0, &table), 1.0);
        assert_eq!(interp(5.0, &table), 7.0);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_signal() {
        let source = BetaSource::Schedule {
            schedule: BetaSchedule::ScaledLinear,
            start: 0.00085,
            end: 0.012,
        };
        let b = rescale_zero_terminal_snr(&betas(&source, 1000).unwrap());
        let ac = alphas_cumprod(&b);
        assert_eq!(*ac.last().unwrap(), 0.0);
        assert!((b[999] - 1.0).abs() < 1e-6);
        // the first ᾱ is unchanged by construction
        let orig = alphas_cumprod(&betas(&source, 1000).unwrap());
        assert!((ac[0] - orig[0]).abs() < 1e-6);
    }

    #[test]
    fn cosine_schedule_is_not_integer_divided() {
        let b = squaredcos_cap_v2(1000);
        assert!(b[0] > 0.0 && b[0] < 1e-3, "{}", b[0]);
        assert_eq!(b[999], 0.999);
    }
}
