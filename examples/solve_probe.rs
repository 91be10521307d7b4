// Temporary probe (not committed): times the solve alone.
use ndarray::{Array2, Array3};
use std::time::Instant;
use time_onnx::edit::solve::{Preservation, solve_preserving};
unsafe extern "C" {
    fn openblas_set_num_threads(n: std::ffi::c_int);
}

fn main() {
    unsafe { openblas_set_num_threads(1) };
    let runs: usize = std::env::args().nth(1).map_or(1, |a| a.parse().unwrap());
    let pairs: usize = std::env::args().nth(2).map_or(80, |a| a.parse().unwrap());
    let prior = pairs > 10;
    let (seq, d) = (77, 768);
    let mut s: u64 = 7;
    let mut rnd = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let src = Array3::from_shape_fn((pairs, seq, d), |_| rnd());
    let mut dst = src.clone();
    for p in 0..pairs {
        for i in 6..seq {
            for k in 0..d {
                dst[[p, i, k]] += 0.1 * rnd();
            }
        }
    }
    let maps: Vec<Vec<usize>> = (0..pairs).map(|_| (0..seq).collect()).collect();
    let x = Array2::from_shape_fn((2000, d), |_| rnd() as f64);
    let gram = x.t().dot(&x);
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..runs {
        let t = Instant::now();
        let pr = prior.then(|| Preservation {
            gram: gram.view(),
            scale: 0.1,
        });
        let op = solve_preserving(src.view(), dst.view(), &maps, 0.1, pr).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let c = op.change();
        let c32 = c.map(|v| v as f32);
        println!(
            "solve {ms:.1} ms, change {:.1} ms (dim {})",
            t.elapsed().as_secs_f64() * 1e3,
            c32.dim()
        );
    }
}
