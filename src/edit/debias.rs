//! Debiasing towards a mix of attributes (UCE's debias, Gandikota et al.
//! 2024, after TIME's paper), kept one operator A.
//!
//! UCE moves a concept's values towards its attributes': for a concept c
//! (say "a doctor") and attributes aⱼ ("a male doctor", "a female
//! doctor"), the target value is v* = W c + Σⱼ wⱼ ‖W c‖ W aⱼ/‖W aⱼ‖, and
//! the weights wⱼ are adjusted from the mix a judge measures in generated
//! images until it matches the one asked for. The norms there are per
//! layer, which would make each layer's update its own map; here they are
//! taken on the embeddings: c* = c + Σⱼ wⱼ (‖c‖/‖aⱼ‖) aⱼ and v* = W c*, so
//! the edit is TIME's closed form with c* as the destination, one A for
//! every layer, an operator file and `generate --edit` like any other edit.
//!
//! Rows are UCE's: each prompt from its last word token on, all trimmed to
//! one length (`seq` − the latest start), row i of the concept pairing with
//! row i of each attribute. Norms are Frobenius norms over those rows.

use std::ops::Range;

use ndarray::{Array2, ArrayView2};

/// The rows of each prompt: from its last word token (its token count with
/// BOS and EOS, minus 2) to `seq` − max(starts) rows later, as UCE's script
/// slices them. `lens`: each prompt's token count with BOS and EOS (≥ 2).
pub fn positions(lens: &[usize], seq: usize) -> Vec<Range<usize>> {
    let starts: Vec<usize> = lens.iter().map(|l| l.saturating_sub(2).min(seq)).collect();
    let len = seq - starts.iter().copied().max().unwrap_or(0);
    starts.into_iter().map(|s| s..s + len).collect()
}

/// c* = c + Σⱼ wⱼ (‖c‖/‖aⱼ‖) aⱼ for the concept's rows `concept: [r, d]` and
/// each attribute's `attributes[j]: [r, d]` (f32 embeddings), in f64.
/// An attribute whose rows are all zero adds nothing.
pub fn targets(
    concept: ArrayView2<'_, f32>,
    attributes: &[ArrayView2<'_, f32>],
    weights: &[f64],
) -> Array2<f64> {
    let norm = |x: &ArrayView2<'_, f32>| {
        x.iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    };
    let c_norm = norm(&concept);
    let mut out = concept.mapv(f64::from);
    for (a, &w) in attributes.iter().zip(weights) {
        let a_norm = norm(a);
        if a_norm > 0.0 && w != 0.0 {
            out.scaled_add(w * c_norm / a_norm, &a.mapv(f64::from));
        }
    }
    out
}

/// UCE's update of the weights after a measurement: wⱼ + step·(wantedⱼ −
/// measuredⱼ), kept ≥ 0. (UCE's script keeps only the new step and lets the
/// edits of successive rounds compound in the weights; solving every round
/// from the unedited model, the steps are summed instead, which keeps the
/// result one edit. UCE lets a weight go negative, moving the concept away
/// from an attribute it shows too often; here that weight stops at 0 and
/// the others grow instead: subtracting "a red circle" from "a circle"
/// drew circles of neither colour on the toy model, 9% of 256 images at
/// weights (−0.38, +0.38) against 2% at (0, +0.8) for the same mix.)
pub fn next_weights(weights: &[f64], wanted: &[f64], measured: &[f64], step: f64) -> Vec<f64> {
    weights
        .iter()
        .zip(wanted.iter().zip(measured))
        .map(|(w, (t, m))| (w + step * (t - m)).max(0.0))
        .collect()
}

/// The step of the next round: doubled while the mix keeps missing on the
/// same side (the misses of two rounds point the same way), up to
/// [`MAX_STEP_GROWTH`] times the `first` step, and halved once it has
/// stepped over (they point opposite ways). Judged on the same seeds every
/// round, the mix is a function of the weights alone, so this brackets the
/// weights where it crosses the wanted one instead of creeping towards them
/// at UCE's fixed step or circling them.
pub fn next_step(step: f64, first: f64, previous_miss: Option<&[f64]>, miss: &[f64]) -> f64 {
    let Some(previous) = previous_miss else {
        return step;
    };
    let agreement: f64 = previous.iter().zip(miss).map(|(a, b)| a * b).sum();
    if agreement > 0.0 {
        (step * 2.0).min(first * MAX_STEP_GROWTH)
    } else if agreement < 0.0 {
        step / 2.0
    } else {
        step
    }
}

/// How far [`next_step`] lets the step grow: a judge that never sees an
/// attribute (whatever the weights) must not drive them to infinity; from
/// UCE's 0.1 this allows 1.6 per unit of share missed, enough to reach the
/// concept's own norm in one round.
pub const MAX_STEP_GROWTH: f64 = 16.0;

/// wantedⱼ − measuredⱼ for each attribute.
pub fn miss(wanted: &[f64], measured: &[f64]) -> Vec<f64> {
    wanted.iter().zip(measured).map(|(t, m)| t - m).collect()
}

/// The largest |measured − wanted| over the attributes.
pub fn gap(wanted: &[f64], measured: &[f64]) -> f64 {
    wanted
        .iter()
        .zip(measured)
        .map(|(t, m)| (t - m).abs())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rows_start_at_each_last_word_and_share_one_length() {
        // "a circle" (4 tokens with BOS/EOS), "a red circle" (5)
        assert_eq!(positions(&[4, 5, 5], 77), vec![2..76, 3..77, 3..77]);
        assert_eq!(positions(&[2], 77), vec![0..77]);
    }

    #[test]
    fn targets_add_each_attribute_at_the_concepts_norm() {
        let c = array![[3.0f32, 4.0]]; // ‖c‖ = 5
        let a = array![[0.0f32, 2.0]]; // ‖a‖ = 2
        let b = array![[1.0f32, 0.0]];
        let t = targets(c.view(), &[a.view(), b.view()], &[0.5, -0.2]);
        // c + 0.5·(5/2)·a − 0.2·5·b
        assert_eq!(t, array![[3.0 - 1.0, 4.0 + 2.5]]);
        assert_eq!(targets(c.view(), &[a.view()], &[0.0]), c.mapv(f64::from));
    }

    #[test]
    fn weights_move_towards_the_wanted_mix_and_stay_non_negative() {
        let w = next_weights(&[0.0, 0.0], &[0.5, 0.5], &[1.0, 0.0], 0.1);
        assert!(w[0] == 0.0 && (w[1] - 0.05).abs() < 1e-15, "{w:?}");
        let w = next_weights(&[0.3, 0.2], &[0.5, 0.5], &[0.2, 0.8], 0.5);
        assert!(
            (w[0] - 0.45).abs() < 1e-15 && (w[1] - 0.05).abs() < 1e-15,
            "{w:?}"
        );
        assert!((gap(&[0.5, 0.5], &[0.9, 0.1]) - 0.4).abs() < 1e-15);
        assert_eq!(miss(&[0.5, 0.5], &[0.75, 0.25]), vec![-0.25, 0.25]);
    }

    #[test]
    fn the_step_doubles_while_missing_on_one_side_up_to_a_cap_and_halves_past_the_mix() {
        let previous: &[f64] = &[-0.5, 0.5];
        assert_eq!(next_step(0.1, 0.1, None, &[-0.5, 0.5]), 0.1);
        assert_eq!(next_step(0.1, 0.1, Some(previous), &[-0.2, 0.2]), 0.2);
        assert_eq!(next_step(0.1, 0.1, Some(previous), &[0.1, -0.1]), 0.05);
        assert_eq!(next_step(0.1, 0.1, Some(previous), &[0.0, 0.0]), 0.1);
        // growth stops at MAX_STEP_GROWTH times the first step
        assert_eq!(next_step(1.6, 0.1, Some(previous), &[-0.2, 0.2]), 1.6);
    }
}
