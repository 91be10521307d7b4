//! The seeded random numbers of generation: initial latents and the noise of
//! stochastic schedulers. One explicit generator, passed around, never global.
//!
//! The algorithm is fixed and documented so that another implementation can
//! reproduce our latents from a seed (bit-equality with `torch.randn` is not
//! a goal: torch's CPU generator is MT19937 with its own normal transform):
//!
//! 1. **Seeding.** The four 64-bit words of the state are four successive
//!    outputs of SplitMix64 started at the seed: `z += 0x9E3779B97F4A7C15;
//!    z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) ·
//!    0x94D049BB133111EB; out = z ^ (z >> 31)` (wrapping arithmetic). The
//!    state is then never all zero.
//! 2. **Bits.** xoshiro256++ (Blackman & Vigna 2019):
//!    `out = rotl(s0 + s3, 23) + s0; t = s1 << 17; s2 ^= s0; s3 ^= s1;
//!    s1 ^= s2; s0 ^= s3; s2 ^= t; s3 = rotl(s3, 45)` (wrapping additions).
//! 3. **Uniform.** `u = ((out >> 11) + 0.5) · 2⁻⁵³`, in the open interval
//!    (0, 1), so the logarithm below is finite.
//! 4. **Normal.** Box–Muller on consecutive uniforms (u₁, u₂), in f64:
//!    r = √(−2 ln u₁), θ = 2π·u₂, giving r·cos θ then r·sin θ, each rounded to
//!    f32. A tensor is filled in C (row-major) order, two values per pair; for
//!    an odd count the last pair's sine value is dropped. Nothing is carried
//!    between calls, so the values depend only on the seed and the sequence of
//!    requested sizes.
//!
//! Step 4 uses the platform's `ln`, `cos`, `sin`; these may differ in the last
//! f64 bit between libms, which survives rounding to f32 only in rare ties.

use ndarray::{ArrayD, IxDyn};

/// xoshiro256++ seeded by SplitMix64, with a Box–Muller normal sampler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

/// One SplitMix64 step: advances `z` and returns the output.
fn splitmix64(z: &mut u64) -> u64 {
    *z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut x = *z;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Rng {
    /// The generator for `seed` (step 1 of the module documentation).
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let state = [
            splitmix64(&mut z),
            splitmix64(&mut z),
            splitmix64(&mut z),
            splitmix64(&mut z),
        ];
        Self { state }
    }

    /// The next 64 random bits (xoshiro256++).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// A uniform number in the open interval (0, 1), 53 random bits.
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with N(0, 1) values (Box–Muller, pairs in order).
    pub fn fill_randn(&mut self, out: &mut [f32]) {
        for pair in out.chunks_mut(2) {
            let (u1, u2) = (self.next_open01(), self.next_open01());
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            pair[0] = (r * theta.cos()) as f32;
            if let Some(second) = pair.get_mut(1) {
                *second = (r * theta.sin()) as f32;
            }
        }
    }

    /// A tensor of N(0, 1) values of `shape`, f32, filled in C order, e.g. the
    /// initial latents `[b, 4, h/8, w/8] f32` (multiply by the scheduler's
    /// `init_noise_sigma`).
    pub fn randn(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let mut a = ArrayD::<f32>::zeros(IxDyn(shape));
        if let Some(slice) = a.as_slice_mut() {
            self.fill_randn(slice);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers from an independent Python implementation of the
    /// documented algorithm (SplitMix64 → xoshiro256++).
    #[test]
    fn matches_the_documented_algorithm() {
        let mut z = 0u64;
        assert_eq!(splitmix64(&mut z), 0xE220_A839_7B1D_CDAF);
        let mut rng = Rng::new(42);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(got, KAT_U64_SEED42);
        let mut rng = Rng::new(42);
        let n = rng.randn(&[5]);
        for (a, b) in n.iter().zip(KAT_RANDN_SEED42) {
            assert_eq!(*a, b, "{n:?}");
        }
    }

    const KAT_U64_SEED42: [u64; 3] = [
        0xD076_4D4F_4476_689F,
        0x519E_4174_576F_3791,
        0xFBE0_7CFB_0C24_ED8C,
    ];
    const KAT_RANDN_SEED42: [f32; 5] = [
        -0.268_607_38,
        0.581_971_05,
        -0.054_462_17,
        -0.171_778_2,
        -0.578_575_4,
    ];

    #[test]
    fn reproducible_for_a_seed() {
        let a = Rng::new(7).randn(&[2, 4, 3, 3]);
        let b = Rng::new(7).randn(&[2, 4, 3, 3]);
        assert_eq!(a, b);
        assert_eq!(a.shape(), &[2, 4, 3, 3]);
    }

    #[test]
    fn different_seeds_differ() {
        let a = Rng::new(1).randn(&[64]);
        let b = Rng::new(2).randn(&[64]);
        assert!(a.iter().zip(b.iter()).filter(|(x, y)| x != y).count() > 60);
    }

    #[test]
    fn standard_normal_moments() {
        let n = 100_000;
        let v = Rng::new(1234).randn(&[n]);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        // standard errors: mean 1/√n ≈ 0.0032, std ≈ 0.0022
        assert!(mean.abs() < 0.015, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "std {}", var.sqrt());
        let beyond3 = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n as f64;
        assert!((beyond3 - 0.0027).abs() < 0.001, "tail {beyond3}");
    }

    #[test]
    fn odd_lengths_drop_the_last_sine() {
        let mut a = Rng::new(9);
        let three = a.randn(&[3]);
        let mut b = Rng::new(9);
        let four = b.randn(&[4]);
        assert_eq!(three.as_slice().unwrap(), &four.as_slice().unwrap()[..3]);
        // both consumed two pairs
        assert_eq!(a, b);
    }
}
