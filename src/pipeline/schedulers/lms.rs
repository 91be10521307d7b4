//! LMS: the linear multistep method on dx/dσ = (x − x̂₀)/σ, order 4 (lower
//! while fewer derivatives exist), one UNet call per step.
//!
//! x' = x + Σⱼ cⱼ·dₜ₋ⱼ where cⱼ = ∫ from σₜ to σₜ₊₁ of the Lagrange basis
//! polynomial ℓⱼ(τ) = Πₘ≠ⱼ (τ − σₜ₋ₘ)/(σₜ₋ⱼ − σₜ₋ₘ) through the last `order`
//! σ. diffusers integrates ℓⱼ with `scipy.integrate.quad`; ℓⱼ has degree
//! ≤ 3, so here it is expanded into monomials (in τ − σₜ, for conditioning)
//! and integrated exactly.

use ndarray::{ArrayD, Zip};

use super::plan::{Call, Plan, Rule, Scheduler, interpolated_sigmas, sigma_x0};
use super::{FinalSigmas, PredictionType, SchedulerError, SchedulerKind, Settings};

/// diffusers' default `order` argument of `LMSDiscreteScheduler.step`.
const ORDER: usize = 4;

/// LMS's update and history; the plan holds the σ.
#[derive(Debug)]
pub(super) struct Lms {
    prediction: PredictionType,
    /// dx/dσ of the last calls, oldest first (at most [`ORDER`]).
    derivatives: Vec<ArrayD<f32>>,
}

/// LMS for `steps` steps (the class has no `final_sigmas_type`: the last σ
/// is 0).
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let plan = interpolated_sigmas(settings, steps, FinalSigmas::Zero)?;
    let rule = Lms {
        prediction: settings.prediction_type,
        derivatives: Vec::with_capacity(ORDER),
    };
    Ok(Scheduler::new(SchedulerKind::Lms, plan, rule))
}

/// ∫ from σ[t] to σ[t+1] of the Lagrange basis polynomial ℓⱼ through
/// σ[t], σ[t−1], …, σ[t−order+1], computed exactly.
pub(crate) fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, j: usize) -> f64 {
    let origin = sigmas[t];
    let node = |m: usize| sigmas[t - m] - origin;
    // ℓⱼ(u) in powers of u = τ − σ[t], lowest first
    let mut poly = vec![1.0f64];
    for m in (0..order).filter(|&m| m != j) {
        let (root, scale) = (node(m), 1.0 / (node(j) - node(m)));
        let mut next = vec![0.0; poly.len() + 1];
        for (i, &p) in poly.iter().enumerate() {
            next[i + 1] += p * scale;
            next[i] -= p * root * scale;
        }
        poly = next;
    }
    let h = sigmas[t + 1] - origin;
    poly.iter()
        .enumerate()
        .map(|(i, &p)| p * h.powi(i as i32 + 1) / (i + 1) as f64)
        .sum()
}

impl Rule for Lms {
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let sigmas = plan.sigmas.as_deref().unwrap_or_default();
        let sigma = plan.sigma(call.index);
        let x0 = sigma_x0(self.prediction, &call.model_output, &call.sample, sigma);
        let s = sigma as f32;
        let derivative = Zip::from(&call.sample)
            .and(&x0)
            .map_collect(|&x, &x0| (x - x0) / s);
        if self.derivatives.len() == ORDER {
            self.derivatives.remove(0);
        }
        self.derivatives.push(derivative);

        let order = (call.index + 1).min(ORDER);
        // Σⱼ cⱼ·d₍t−j₎, summed in f32 in diffusers' order (j = 0 first)
        let mut sum = ArrayD::<f32>::zeros(call.sample.shape());
        for (j, d) in self.derivatives.iter().rev().take(order).enumerate() {
            let c = lms_coefficient(sigmas, order, call.index, j) as f32;
            Zip::from(&mut sum).and(d).for_each(|acc, &d| *acc += c * d);
        }
        Ok(Zip::from(&call.sample)
            .and(&sum)
            .map_collect(|&x, &s| x + s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Composite Simpson on a cubic is exact, so it is an independent check
    /// of the expansion.
    fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
        let n = 64;
        let h = (b - a) / n as f64;
        let mut s = f(a) + f(b);
        for i in 1..n {
            s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0
    }

    #[test]
    fn coefficients_are_exact_integrals_of_the_basis() {
        let sigmas = [14.6, 9.7, 6.3, 4.1, 2.7, 0.0];
        for t in 0..5 {
            let order = (t + 1).min(ORDER);
            let mut total = 0.0;
            for j in 0..order {
                let basis = |tau: f64| {
                    (0..order)
                        .filter(|&m| m != j)
                        .map(|m| (tau - sigmas[t - m]) / (sigmas[t - j] - sigmas[t - m]))
                        .product::<f64>()
                };
                let reference = simpson(basis, sigmas[t], sigmas[t + 1]);
                let c = lms_coefficient(&sigmas, order, t, j);
                assert!(
                    (c - reference).abs() < 1e-12 * reference.abs().max(1.0),
                    "{c} {reference}"
                );
                total += c;
            }
            // the basis sums to 1, so the coefficients sum to the step length
            assert!((total - (sigmas[t + 1] - sigmas[t])).abs() < 1e-12);
        }
    }
}
