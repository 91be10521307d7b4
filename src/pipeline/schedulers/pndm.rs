//! PNDM in its PLMS form (`skip_prk_steps = true`, SD 1.x's shipped
//! scheduler): a 4th-order Adams–Bashforth method on ε, warmed up with one
//! extra UNet call, so N steps take N+1 calls.
//!
//! diffusers' call pattern, reproduced exactly (δ = T // N, even when the
//! spacing is not `leading`):
//! - call 0 at t₀: store ε₀ and x₀, step x₀ → t₀ − δ with ε₀;
//! - call 1 at t₀ − δ (the same timestep as call 2): step from the *stored*
//!   x₀ at t₀ to t₀ − δ with (ε₀ + ε₁)/2 — ε₁ is then forgotten;
//! - later calls: Adams–Bashforth on the history ε₀, ε₂, ε₃, … with
//!   (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24.
//!
//! The update is PNDM's eq. (9): x' = √(ᾱp/ᾱt)·x − (ᾱp − ᾱt)·ε /
//! (ᾱt·√(1−ᾱp) + √(ᾱt(1−ᾱt)ᾱp)), with ᾱp = ᾱ₀ (or 1 with
//! `set_alpha_to_one`) past the last timestep.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::plan::{Call, Plan, Rule, Scheduler};
use super::schedule::{NoiseSchedule, integer_timesteps};
use super::{PredictionType, SchedulerError, SchedulerKind, Settings};

/// PLMS's update and history.
#[derive(Debug)]
pub(super) struct Pndm {
    /// ᾱ at (t, t_prev) for each call, checked at build time.
    alphas: Vec<(f64, f64)>,
    prediction: PredictionType,
    /// ε history for Adams–Bashforth (at most 4, call 1's output excluded).
    ets: Vec<ArrayD<f32>>,
    /// x at call 0, reused by call 1.
    first_sample: Option<ArrayD<f32>>,
}

/// PLMS for `steps` steps (`steps + 1` calls when `steps` ≥ 2).
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let schedule = NoiseSchedule::for_alphas(settings)?;
    // diffusers' PNDM keeps them ascending; same values as DDIM's.
    let mut base = integer_timesteps(settings, steps);
    base.reverse();
    // plms = concat(ts[:-1], ts[-2:-1], ts[-1:]) reversed
    let n = base.len();
    let mut plms: Vec<i64> = base[..n - 1].to_vec();
    if n >= 2 {
        plms.push(base[n - 2]);
    }
    plms.push(base[n - 1]);
    plms.reverse();

    let delta = (settings.num_train_timesteps / steps) as i64;
    // call 1 steps from t + δ (where x₀ was) to t
    let steps = plms.iter().enumerate().map(|(call, &t)| match call {
        1 => (t.saturating_add(delta), t),
        _ => (t, t.saturating_sub(delta)),
    });
    let alphas = schedule.alpha_pairs(settings, steps)?;
    let rule = Pndm {
        alphas,
        prediction: settings.prediction_type,
        ets: Vec::with_capacity(4),
        first_sample: None,
    };
    Ok(Scheduler::new(
        SchedulerKind::Pndm,
        Plan::on_alphas(&plms),
        rule,
    ))
}

impl Rule for Pndm {
    fn step(&mut self, _plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let (a_t, a_prev) = self.alphas[call.index];
        let output = call.model_output.to_owned();
        if call.index != 1 {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(output.clone());
        }
        let x = match (call.index, &self.first_sample) {
            (1, Some(x0)) => x0.view(),
            _ => call.sample.view(),
        };
        let eps = match (call.index, self.ets.as_slice()) {
            (0, _) => output,
            (1, [.., e0]) => Zip::from(&output)
                .and(e0)
                .map_collect(|&e1, &e0| (e1 + e0) / 2.0),
            (_, [e2, e1]) => Zip::from(e1)
                .and(e2)
                .map_collect(|&a, &b| (3.0 * a - b) / 2.0),
            (_, [e3, e2, e1]) => Zip::from(e1)
                .and(e2)
                .and(e3)
                .map_collect(|&a, &b, &c| (23.0 * a - 16.0 * b + 5.0 * c) / 12.0),
            (_, [e4, e3, e2, e1]) => {
                let mut eps = Zip::from(e1)
                    .and(e2)
                    .and(e3)
                    .map_collect(|&a, &b, &c| 55.0 * a - 59.0 * b + 37.0 * c);
                Zip::from(&mut eps)
                    .and(e4)
                    .for_each(|acc, &d| *acc = (1.0 / 24.0) * (*acc - 9.0 * d));
                eps
            }
            _ => output,
        };
        let out = prev_sample(self.prediction, x, eps.view(), a_t, a_prev);
        if call.index == 0 {
            self.first_sample = Some(call.sample.to_owned());
        } else if call.index == 1 {
            self.first_sample = None;
        }
        Ok(out)
    }
}

/// PNDM's eq. (9) from ᾱt to ᾱp (v-prediction converted to ε first).
fn prev_sample(
    prediction: PredictionType,
    x: ArrayViewD<'_, f32>,
    model_output: ArrayViewD<'_, f32>,
    a_t: f64,
    a_prev: f64,
) -> ArrayD<f32> {
    let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
    let x_coeff = (a_prev / a_t).sqrt() as f32;
    let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
    let e_coeff = ((a_prev - a_t) / denom) as f32;
    match prediction {
        PredictionType::VPrediction => {
            let (sa, sb) = (a_t.sqrt() as f32, b_t.sqrt() as f32);
            Zip::from(&x)
                .and(&model_output)
                .map_collect(|&x, &v| x_coeff * x - e_coeff * (sa * v + sb * x))
        }
        // resolve() only lets ε and v through for PNDM
        PredictionType::Epsilon | PredictionType::Sample => Zip::from(&x)
            .and(&model_output)
            .map_collect(|&x, &e| x_coeff * x - e_coeff * e),
    }
}
