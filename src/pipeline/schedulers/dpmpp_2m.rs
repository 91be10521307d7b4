//! DPM-Solver++ multistep (Lu et al. 2022), by default 2M: second order from
//! the second call on, from the current and previous x₀ predictions; one
//! UNet call per step.
//!
//! With σ from the interpolated training schedule, αₜ = 1/√(σ² + 1),
//! σₜ = σ·αₜ, λ = ln αₜ − ln σₜ and h = λ_next − λ:
//! - first order: x' = (σₜ'/σₜ)·x − αₜ'(e^(−h) − 1)·D₀;
//! - second order (midpoint): also − ½·αₜ'(e^(−h) − 1)·D₁, D₁ = (m₀ − m₁)/r₀,
//!   r₀ = h₀/h (Heun: + αₜ'((e^(−h) − 1)/h + 1)·D₁);
//! - third order as diffusers' `multistep_dpm_solver_third_order_update`.
//!
//! Order is lowered exactly when diffusers lowers it: first order on the first
//! call; on the last call when `euler_at_final`, or `lower_order_final` with
//! fewer than 15 calls, or `final_sigmas_type = "zero"` (so with the defaults
//! the last step is always first order and lands on x₀); second order on the
//! last-but-one call with `lower_order_final` and fewer than 15 calls.
//!
//! Timesteps differ from the other schedulers: `linspace` picks N of N+1
//! points (`linspace(0, T_last − 1, N + 1)` rounded, reversed, last dropped:
//! 999, 899, …, 100 for 10 steps), `leading` likewise with ratio
//! T_last // (N + 1), where T_last excludes the timesteps whose λ lies below
//! `lambda_min_clipped`.

use ndarray::{ArrayD, Zip};

use super::plan::{Call, Plan, Rule, Scheduler, final_sigma_value};
use super::schedule::{NoiseSchedule, TimestepSpacing, interp, np_arange, np_linspace};
use super::{
    DpmSettings, FinalSigmas, PredictionType, SchedulerError, SchedulerKind, Settings, SolverType,
};

/// DPM-Solver++'s update and history; the plan holds the σ.
#[derive(Debug)]
pub(super) struct DpmSolver {
    prediction: PredictionType,
    dpm: DpmSettings,
    final_sigma_zero: bool,
    /// x₀ predictions of the last calls, oldest first (at most `solver_order`).
    model_outputs: Vec<ArrayD<f32>>,
    /// How many updates have run, capped at `solver_order`.
    lower_order_nums: usize,
}

/// diffusers' DPM-Solver timesteps (integers, descending).
fn dpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (steps + 1)) as i64;
            (1..=steps as i64)
                .rev()
                .map(|i| (i * ratio).saturating_add(steps_offset))
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(
            last_timestep as f64,
            0.0,
            -(num_train_timesteps as f64 / steps as f64),
        )
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect(),
    }
}

/// (αₜ, σₜ) of the VP parameterisation at noise level σ.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ (+∞ at σ = 0).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// DPM-Solver++ for `steps` steps.
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let schedule = NoiseSchedule::for_sigmas(settings)?;
    let t_count = settings.num_train_timesteps;
    let dpm = settings.dpm.clone();

    // T_last: drop the timesteps whose λ (float32, as diffusers' lambda_t)
    // is below lambda_min_clipped (searchsorted on λ ascending).
    let clipped = schedule
        .alphas_cumprod
        .iter()
        .rev()
        .map(|&a| f64::from(a.sqrt().ln() - (1.0 - a).sqrt().ln()))
        .take_while(|&l| l < dpm.lambda_min_clipped)
        .count();
    let last_timestep = t_count - clipped;

    let timesteps = dpm_timesteps(
        settings.timestep_spacing,
        t_count,
        last_timestep,
        steps,
        settings.steps_offset,
    );
    let table = schedule.train_sigmas();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| f64::from(interp(t as f64, &table) as f32))
        .collect();
    sigmas.push(final_sigma_value(&table, settings.final_sigmas_type));
    let plan = Plan {
        timesteps: timesteps.iter().map(|&t| t as f64).collect(),
        sigmas: Some(sigmas),
        init_noise_sigma: 1.0,
        scales_input: false,
    };
    let rule = DpmSolver {
        prediction: settings.prediction_type,
        final_sigma_zero: settings.final_sigmas_type == FinalSigmas::Zero,
        model_outputs: Vec::with_capacity(dpm.solver_order),
        lower_order_nums: 0,
        dpm,
    };
    Ok(Scheduler::new(
        SchedulerKind::DpmSolverMultistep,
        plan,
        rule,
    ))
}

impl DpmSolver {
    /// The order diffusers uses for call `call`.
    fn order_for(&self, call: usize, n: usize) -> usize {
        let few = self.dpm.lower_order_final && n < 15;
        let last = call + 1 == n && (self.dpm.euler_at_final || few || self.final_sigma_zero);
        let second_last = call + 2 == n && few;
        if self.dpm.solver_order == 1 || self.lower_order_nums < 1 || last {
            1
        } else if self.dpm.solver_order == 2 || self.lower_order_nums < 2 || second_last {
            2
        } else {
            3
        }
    }
}

impl Rule for DpmSolver {
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let order = self.order_for(call.index, plan.timesteps.len());

        // convert_model_output: the x₀ prediction
        let (alpha_s0, sigma_s0) = alpha_sigma(plan.sigma(call.index));
        let (a, s) = (alpha_s0 as f32, sigma_s0 as f32);
        let m0 = match self.prediction {
            PredictionType::Epsilon => Zip::from(&call.sample)
                .and(&call.model_output)
                .map_collect(|&x, &e| (x - s * e) / a),
            PredictionType::VPrediction => Zip::from(&call.sample)
                .and(&call.model_output)
                .map_collect(|&x, &v| a * x - s * v),
            PredictionType::Sample => call.model_output.to_owned(),
        };
        if self.model_outputs.len() == self.dpm.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(m0);

        let (alpha_t, sigma_t) = alpha_sigma(plan.sigma(call.index + 1));
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0; // e^(−h) − 1
        let x_coeff = (sigma_t / sigma_s0) as f32;
        let d0_coeff = (-alpha_t * em1) as f32;
        let outputs = self.model_outputs.as_slice();
        let prev = match (order, outputs) {
            (2, [.., m1, m0]) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(plan.sigma(call.index - 1));
                let r0 = (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h;
                let d1_coeff = match self.dpm.solver_type {
                    SolverType::Midpoint => -0.5 * alpha_t * em1,
                    SolverType::Heun => alpha_t * (em1 / h + 1.0),
                } as f32;
                let inv_r0 = (1.0 / r0) as f32;
                Zip::from(&call.sample)
                    .and(m0)
                    .and(m1)
                    .map_collect(|&x, &m0, &m1| {
                        x_coeff * x + d0_coeff * m0 + d1_coeff * (inv_r0 * (m0 - m1))
                    })
            }
            (3, [.., m2, m1, m0]) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(plan.sigma(call.index - 1));
                let (alpha_s2, sigma_s2) = alpha_sigma(plan.sigma(call.index - 2));
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let lambda_s2 = lambda(alpha_s2, sigma_s2);
                let (r0, r1) = ((lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h);
                let (inv_r0, inv_r1) = ((1.0 / r0) as f32, (1.0 / r1) as f32);
                let (w, inv_sum) = ((r0 / (r0 + r1)) as f32, (1.0 / (r0 + r1)) as f32);
                let d1_coeff = (alpha_t * (em1 / h + 1.0)) as f32;
                let d2_coeff = (-alpha_t * ((em1 + h) / (h * h) - 0.5)) as f32;
                let mut prev = Zip::from(&call.sample)
                    .and(m0)
                    .map_collect(|&x, &m0| x_coeff * x + d0_coeff * m0);
                Zip::from(&mut prev)
                    .and(m0)
                    .and(m1)
                    .and(m2)
                    .for_each(|p, &m0, &m1, &m2| {
                        let d1_0 = inv_r0 * (m0 - m1);
                        let d1_1 = inv_r1 * (m1 - m2);
                        let d1 = d1_0 + w * (d1_0 - d1_1);
                        let d2 = inv_sum * (d1_0 - d1_1);
                        *p += d1_coeff * d1 + d2_coeff * d2;
                    });
                prev
            }
            (_, [.., m0]) => Zip::from(&call.sample)
                .and(m0)
                .map_collect(|&x, &m0| x_coeff * x + d0_coeff * m0),
            (_, []) => call.sample.to_owned(),
        };
        if self.lower_order_nums < self.dpm.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
