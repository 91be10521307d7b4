//! The closed-form solve: one operator A for every edited projection.
//!
//! With c the source embedding at each position and c* the destination
//! embedding at the aligned position (all positions of every pair, padding
//! included, as in the reference):
//!
//! M = λI + Σ c cᵀ (symmetric positive definite), N = λI + Σ c* cᵀ,
//! A = N·M⁻¹, W' = W·A.
//!
//! Only positions where c* ≠ c contribute to N − M, so
//! Aᵀ = I + M⁻¹·Σ c (c* − c)ᵀ: the identity plus a matrix of rank r at most
//! the number of such positions. Positions before the first differing token
//! have c* = c exactly (the text encoder is causal), so r is a little below
//! the number of positions: 283 of 308 for "A pack of roses" → "A pack of
//! blue roses" with the default augmentations. The change is kept factored,
//! Aᵀ − I = P·Y with P `[d, r]` orthonormal; while 2r < d, editing a weight
//! as Wᵀ + P·(Y·Wᵀ) takes 2r/d of the multiplications of Aᵀ·Wᵀ (0.74 for
//! SD 1.x with the example above). P orthonormal keeps rounding as small as
//! the dense product's, and makes ‖Y·Wᵀ‖ the size of the change. When as
//! many positions move as half the width (many edits solved together),
//! factors would save nothing and Aᵀ is formed dense.
//!
//! Everything is accumulated in f64: M's condition number reaches 1e5 on
//! real prompts and the float32 reference is off by ~6e-4 relative. M is
//! factored once (Cholesky) and solved against, never inverted.

use std::sync::OnceLock;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis, LinalgScalar, Zip, s};
use ndarray_linalg::{Cholesky, QR, UPLO};

use super::EditError;

/// TIME's edit operator, kept transposed for ONNX's transposed weights.
///
/// Holds Aᵀ `[d, d] f64` (d = the text encoder's width: 768 for SD 1.x,
/// 1024 for SD 2.x), so an ONNX K/V weight Wᵀ `[d, out]` edits to
/// W'ᵀ = Aᵀ·Wᵀ; and, when it came from [`solve`], the factors of Aᵀ − I.
#[derive(Debug, Clone)]
pub struct Operator {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Aᵀ itself.
    Dense(Array2<f64>),
    /// Aᵀ − I = P·Y, P orthonormal `[d, r]`, Y `[r, d]`; Aᵀ computed on first
    /// use (editing a UNet needs only the factors).
    Factored {
        p: Array2<f64>,
        y: Array2<f64>,
        at: OnceLock<Array2<f64>>,
    },
}

/// Operators are equal when their matrices are: how they were computed
/// (factored or not) does not matter.
impl PartialEq for Operator {
    fn eq(&self, other: &Self) -> bool {
        self.transposed() == other.transposed()
    }
}

/// Aᵀ − I = P·Y in the form that is cheaper to multiply by: P `[d, r]` with
/// orthonormal columns and Y `[r, d]` when 2r < d, else P = I (implicit) and
/// Y = Aᵀ − I. Either way ‖P·Z‖ = ‖Z‖.
#[derive(Debug, Clone)]
pub struct Change<T> {
    basis: Option<Array2<T>>,
    coefficients: Array2<T>,
}

impl<T: LinalgScalar> Change<T> {
    /// d, the width it acts on.
    pub fn dim(&self) -> usize {
        self.coefficients.ncols()
    }

    /// X ← X + (Aᵀ − I)·X for X `[d, m]`, in place. Returns Z = Y·X, whose
    /// norm is that of the change made to X.
    pub fn add_to(&self, mut x: ArrayViewMut2<'_, T>) -> Array2<T> {
        let z = self.coefficients.dot(&x);
        match &self.basis {
            Some(p) => general_mat_mul(T::one(), p, &z, T::one(), &mut x),
            None => Zip::from(&mut x).and(&z).for_each(|a, &b| *a = *a + b),
        }
        z
    }

    /// The same change with every element mapped (e.g. rounded to f32).
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> Change<U> {
        Change {
            basis: self.basis.as_ref().map(|p| p.mapv(f)),
            coefficients: self.coefficients.mapv(f),
        }
    }
}

impl Operator {
    /// The operator that changes nothing (A = I, `[d, d] f64`).
    pub fn identity(d: usize) -> Self {
        Self {
            repr: Repr::Dense(Array2::eye(d)),
        }
    }

    /// An operator from a known Aᵀ `[d, d] f64` (e.g. a golden file).
    pub fn from_transposed(at: Array2<f64>) -> Result<Self, EditError> {
        let (rows, cols) = at.dim();
        if rows != cols {
            return Err(EditError::Shape {
                what: "operator A^T",
                expected: vec![rows, rows],
                actual: vec![rows, cols],
            });
        }
        Ok(Self {
            repr: Repr::Dense(at),
        })
    }

    /// Aᵀ `[d, d] f64`.
    pub fn transposed(&self) -> ArrayView2<'_, f64> {
        match &self.repr {
            Repr::Dense(at) => at.view(),
            Repr::Factored { p, y, at } => at
                .get_or_init(|| {
                    let mut at = p.dot(y);
                    at.diag_mut().mapv_inplace(|x| x + 1.0);
                    at
                })
                .view(),
        }
    }

    /// d, the embedding width the operator acts on.
    pub fn dim(&self) -> usize {
        match &self.repr {
            Repr::Dense(at) => at.nrows(),
            Repr::Factored { p, .. } => p.nrows(),
        }
    }

    /// Aᵀ − I, factored when that saves multiplications (2r < d).
    pub fn change(&self) -> Change<f64> {
        match &self.repr {
            Repr::Factored { p, y, .. } if 2 * p.ncols() < p.nrows() => Change {
                basis: Some(p.clone()),
                coefficients: y.clone(),
            },
            _ => Change {
                basis: None,
                coefficients: &self.transposed() - &Array2::<f64>::eye(self.dim()),
            },
        }
    }

    /// The operator of this edit followed by `next`: W·A₁·A₂, i.e.
    /// (A₁A₂)ᵀ = A₂ᵀ·A₁ᵀ. Equal to applying one after the other (the
    /// reference's `restart_params=False`), since each A depends on the
    /// embeddings only, not on W.
    pub fn then(&self, next: &Operator) -> Result<Operator, EditError> {
        if next.dim() != self.dim() {
            return Err(EditError::Shape {
                what: "operator to compose with",
                expected: vec![self.dim(), self.dim()],
                actual: vec![next.dim(), next.dim()],
            });
        }
        Ok(Operator {
            repr: Repr::Dense(next.transposed().dot(&self.transposed())),
        })
    }
}

/// The operator of edits made one after another, in that order: [A₁, A₂]
/// acts as the UNet edited by A₁ then by A₂ (W·A₁·A₂, see
/// [`Operator::then`]); `None` for no edits. `generate --edit` and the
/// server compose a request's edits this way.
pub fn compose<'a>(
    ops: impl IntoIterator<Item = &'a Operator>,
) -> Result<Option<Operator>, EditError> {
    let mut composed: Option<Operator> = None;
    for op in ops {
        composed = Some(match composed {
            None => op.clone(),
            Some(acc) => acc.then(op)?,
        });
    }
    Ok(composed)
}

/// Solves TIME's edit for all (source, destination) pairs at once.
///
/// - `src`: source embeddings `[pairs, seq, d]` (f32 as the text encoder
///   gives them, or f64), every position used, padding included.
/// - `dst`: destination embeddings, same shape.
/// - `maps[p][i]`: the destination position of source position `i` in pair
///   `p` (from [`super::align()`]); `pairs` maps of `seq` entries, each < `seq`.
/// - `lambda`: λ > 0; larger keeps the weights closer to the original
///   (the reference's default is 0.1).
///
/// Returns the operator holding Aᵀ = M⁻¹·Nᵀ `[d, d] f64` (M is symmetric)
/// and the factors of Aᵀ − I.
pub fn solve<T: Copy + Into<f64> + Sync>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
    lambda: f64,
) -> Result<Operator, EditError> {
    solve_preserving(src, dst, maps, lambda, None)
}

/// UCE's default preservation scale (`preserve_scale`, unified-concept-editing
/// `train-scripts/train_erase.py`).
pub const DEFAULT_PRESERVE_SCALE: f64 = 0.1;

/// What an edit must leave alone: UCE's preservation term s·Cₚ, with
/// Cₚ = Σ cₚcₚᵀ over every position of every preserved prompt (a
/// [`super::prior::Prior`]) and s its scale.
#[derive(Clone, Copy, Debug)]
pub struct Preservation<'a> {
    /// Cₚ `[d, d] f64`, symmetric positive semi-definite.
    pub gram: ArrayView2<'a, f64>,
    /// s ≥ 0 (UCE's `preserve_scale`).
    pub scale: f64,
}

/// [`solve`] with UCE's preservation term (Gandikota et al. 2024):
/// W' = (λW + Σ W c*cᵀ + s·Σ W cₚcₚᵀ)(λI + Σ ccᵀ + s·Σ cₚcₚᵀ)⁻¹, which is
/// W·A with A = N·M⁻¹ as in [`solve`], M and N both gaining s·Cₚ. N − M
/// does not change, so neither does the factored form of Aᵀ − I; only M
/// does, and it is then the dense d×d matrix to factor.
pub fn solve_preserving<T: Copy + Into<f64> + Sync>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
    lambda: f64,
    preserve: Option<Preservation<'_>>,
) -> Result<Operator, EditError> {
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(EditError::BadLambda { lambda });
    }
    check_shapes(src, dst, maps)?;
    lapack_on_one_thread();
    let d = src.dim().2;
    if let Some(p) = &preserve {
        check_preservation(p, d)?;
    }
    if 2 * count_moved(src, dst, maps) >= d {
        // As many moved positions as half the width (many edits at once):
        // factors would save nothing, and forming Σ c (c* − c)ᵀ `[d, d]`
        // once costs a quarter of B = M⁻¹·C and its QR.
        let (gram, shifts) = dense_sums(src, dst, maps)?;
        let m = system(gram, lambda, preserve);
        // `shifts` holds Σ (c* − c) cᵀ: its transpose is the right-hand side.
        let mut at = solve_spd(&m, shifts.t(), lambda)?;
        at.diag_mut().mapv_inplace(|x| x + 1.0);
        return Ok(Operator {
            repr: Repr::Dense(at),
        });
    }
    let (c, mut shift) = rows_and_shifts(src, dst, maps)?;
    // The positions that move: c* ≠ c. None (source = destination) is A = I.
    let moved: Vec<usize> = (0..c.nrows())
        .filter(|&i| shift.row(i).iter().any(|&x| x != 0.0))
        .collect();
    if moved.is_empty() {
        return Ok(Operator::identity(d));
    }
    let moved_c = c.select(Axis(0), &moved);
    shift = shift.select(Axis(0), &moved);
    // Aᵀ − I = M⁻¹·Σ c (c* − c)ᵀ = B·S with B = M⁻¹·C `[d, k]` (the moved
    // positions' c as columns) and S their shifts as rows `[k, d]`.
    // With B = Q·R: B·S = Q·(R·S), Q orthonormal.
    let b = match preserve {
        None => inverse_times_moved(&c, &moved, lambda)?,
        Some(_) => solve_spd(
            &system(blocked_gram(c.view()), lambda, preserve),
            moved_c.t(),
            lambda,
        )?,
    };
    let (q, r) = b
        .qr()
        .map_err(|source| EditError::Factorization { source })?;
    let y = r.dot(&shift);
    Ok(Operator {
        repr: Repr::Factored {
            p: q,
            y,
            at: OnceLock::new(),
        },
    })
}

/// M = λI + Σ c cᵀ (+ s·Cₚ) `[d, d] f64` from the `gram` Σ c cᵀ.
fn system(mut gram: Array2<f64>, lambda: f64, preserve: Option<Preservation<'_>>) -> Array2<f64> {
    gram.diag_mut().mapv_inplace(|v| v + lambda);
    if let Some(p) = preserve {
        gram.scaled_add(p.scale, &p.gram);
    }
    gram
}

/// B = M⁻¹·C `[d, k] f64`, M = λI + cᵀ·c, for the rows c `[n, d]` and C the
/// `moved` rows of c as columns.
///
/// With fewer rows than columns (n < d: 308 positions against 768 for SD
/// 1.x with the default augmentations) the n×n system is the smaller one:
/// M⁻¹·cᵀ = cᵀ·(λI + c·cᵀ)⁻¹, so B = cᵀ·G⁻¹·E with G = λI + c·cᵀ `[n, n]`
/// and E the moved columns of the n×n identity.
fn inverse_times_moved(
    c: &Array2<f64>,
    moved: &[usize],
    lambda: f64,
) -> Result<Array2<f64>, EditError> {
    let (n, d) = c.dim();
    if n < d {
        let mut pick = Array2::zeros((n, moved.len()));
        for (j, &i) in moved.iter().enumerate() {
            pick[[i, j]] = 1.0;
        }
        let g = regularized_gram(c.t(), lambda);
        Ok(c.t().dot(&solve_spd(&g, pick.view(), lambda)?))
    } else {
        let m = regularized_gram(c.view(), lambda);
        solve_spd(&m, c.select(Axis(0), moved).t(), lambda)
    }
}

/// Cₚ `[d, d]` and finite, s finite and ≥ 0.
fn check_preservation(p: &Preservation<'_>, d: usize) -> Result<(), EditError> {
    if p.gram.dim() != (d, d) {
        return Err(EditError::Shape {
            what: "preservation prior",
            expected: vec![d, d],
            actual: p.gram.shape().to_vec(),
        });
    }
    if !(p.scale.is_finite() && p.scale >= 0.0) {
        return Err(EditError::BadPreserveScale { scale: p.scale });
    }
    if p.gram.iter().any(|v| !v.is_finite()) {
        return Err(EditError::NonFinitePrior);
    }
    Ok(())
}

/// `src` and `dst` `[pairs, seq, d]` alike, d > 0, one map of `seq` entries
/// per pair, each entry < `seq`.
fn check_shapes<T>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
) -> Result<(), EditError> {
    let (pairs, seq, d) = src.dim();
    if d == 0 {
        return Err(EditError::Shape {
            what: "source embeddings (width must be > 0)",
            expected: vec![pairs, seq, 1],
            actual: vec![pairs, seq, d],
        });
    }
    if dst.dim() != src.dim() {
        return Err(EditError::Shape {
            what: "destination embeddings",
            expected: vec![pairs, seq, d],
            actual: dst.shape().to_vec(),
        });
    }
    if maps.len() != pairs {
        return Err(EditError::Shape {
            what: "index maps",
            expected: vec![pairs, seq],
            actual: vec![maps.len()],
        });
    }
    for (pair, map) in maps.iter().enumerate() {
        if map.len() != seq {
            return Err(EditError::Shape {
                what: "index map",
                expected: vec![seq],
                actual: vec![map.len()],
            });
        }
        if let Some((position, &index)) = map.iter().enumerate().find(|(_, j)| **j >= seq) {
            return Err(EditError::IndexOutOfRange {
                pair,
                position,
                index,
                seq_len: seq,
            });
        }
    }
    Ok(())
}

/// The source embeddings as rows c `[pairs·seq, d] f64` and the shifts
/// c* − c of the same rows in f64, row (p, i) of c* being
/// `dst[p, maps[p][i]]` (a shift is exactly zero where c* = c), every
/// embedding checked finite. Shapes are checked beforehand. For the few
/// rows of the factored route; many rows go through [`dense_sums`].
fn rows_and_shifts<T: Copy + Into<f64>>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
) -> Result<(Array2<f64>, Array2<f64>), EditError> {
    let (pairs, seq, d) = src.dim();
    let mut c = Array2::zeros((pairs * seq, d));
    let mut shift = Array2::zeros((pairs * seq, d));
    for (r, (mut c_row, mut s_row)) in c.rows_mut().into_iter().zip(shift.rows_mut()).enumerate() {
        let (pair, position) = (r / seq, r % seq);
        widen_into(&mut c_row, src.slice(s![pair, position, ..]));
        check_finite(c_row.view(), "source", pair, position)?;
        let index = maps[pair][position];
        widen_into(&mut s_row, dst.slice(s![pair, index, ..]));
        check_finite(s_row.view(), "destination", pair, index)?;
        s_row -= &c_row;
    }
    Ok((c, shift))
}

/// How many rows (pair, position) move (see [`moves`]).
fn count_moved<T: Copy + Into<f64>>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
) -> usize {
    let mut moved = 0;
    for (pair, (from, to)) in src.outer_iter().zip(dst.outer_iter()).enumerate() {
        for (position, c) in from.outer_iter().enumerate() {
            moved += usize::from(moves(c, to.row(maps[pair][position])));
        }
    }
    moved
}

/// c* ≠ c in some component, compared as f64 (as the shift c* − c is).
fn moves<T: Copy + Into<f64>>(
    c: ndarray::ArrayView1<'_, T>,
    c_star: ndarray::ArrayView1<'_, T>,
) -> bool {
    c.iter().zip(c_star).any(|(&a, &b)| a.into() != b.into())
}

/// Rows per chunk in [`dense_sums`], and the number of running sums the
/// chunks are dealt to. Fixed, not derived from the core count: the sums
/// are then added in the same order whatever the machine, and an edit
/// comes out the same on two cores as on sixty-four. Two sums, so two
/// threads: each sum is 9.4 MB of fresh memory for d = 768, and on the
/// 2-core VMs measured (Zen 4) page faults cost ~0.55 ms a MB, more than a
/// further thread would save (four sums of 256 rows: 200–235 ms, two of
/// 512: 163–185 ms).
const CHUNK: usize = 512;
const LANES: usize = 2;

/// Σ c cᵀ and Σ (c* − c) cᵀ `[d, d] f64` over every row (pair, position)
/// of many edits solved together (20 edits: 6,160 rows of 768), every
/// embedding checked finite.
///
/// The rows are widened to f64 [`CHUNK`] at a time into a buffer each sum
/// reuses, and each chunk is added to one of [`LANES`] running sums with
/// BLAS (`dsyrk` for the Gram, half a product; `dgemm` over the moved rows
/// only, the others adding zeros). Chunk k goes to sum k mod [`LANES`], the
/// sums added in order at the end. Widening every row up front instead took
/// two 38 MB matrices (their page faults and a pass over memory), and the
/// row bands of one long product packed each band's right-hand side again
/// (20 edits, two Zen 4 cores: 26 + 60 + 95 ms that way, 163–185 ms this
/// way). Each lane's first chunk writes its sums rather than adding to
/// zeros, and the lanes are added onto the first one's: BLAS adding to a
/// fresh zeroed matrix reads each page before writing it, and the write
/// then replaces the shared zero page with a TLB flush on every core, an
/// interrupt to each (a VM exit). The whole solve of those 20 edits with a
/// prior, timed inside the tool on the same VM: 193–217 ms adding to zeros,
/// 158–176 ms not.
fn dense_sums<T: Copy + Into<f64> + Sync>(
    src: ArrayView3<'_, T>,
    dst: ArrayView3<'_, T>,
    maps: &[Vec<usize>],
) -> Result<(Array2<f64>, Array2<f64>), EditError> {
    let (pairs, seq, d) = src.dim();
    let chunks = (pairs * seq).div_ceil(CHUNK);
    let lanes = LANES.min(chunks);
    let lane = |l: usize| -> Result<(Array2<f64>, Array2<f64>), (usize, EditError)> {
        let (mut gram, mut shifts) = (Array2::zeros((d, d)), Array2::zeros((d, d)));
        let (mut c, mut shift) = (Array2::zeros((CHUNK, d)), Array2::zeros((CHUNK, d)));
        for k in (l..chunks).step_by(lanes) {
            let first = k * CHUNK;
            let rows = CHUNK.min(pairs * seq - first);
            // Moved rows first, then the others: `moved` rows of c pair
            // with the rows of `shift`.
            let (mut moved, mut still) = (0, rows);
            for r in first..first + rows {
                let (pair, position) = (r / seq, r % seq);
                let index = maps[pair][position];
                let (from, to) = (
                    src.slice(s![pair, position, ..]),
                    dst.slice(s![pair, index, ..]),
                );
                let moving = moves(from, to);
                let slot = if moving { moved } else { still - 1 };
                let mut row = c.row_mut(slot);
                widen_into(&mut row, from);
                check_finite(row.view(), "source", pair, position).map_err(|e| (k, e))?;
                if moving {
                    let mut s_row = shift.row_mut(moved);
                    widen_into(&mut s_row, to);
                    check_finite(s_row.view(), "destination", pair, index).map_err(|e| (k, e))?;
                    s_row -= &c.row(moved);
                    moved += 1;
                } else {
                    still -= 1;
                }
            }
            // A lane's first chunk overwrites its sums (β = 0): they are
            // fresh zero pages, and BLAS reading them before writing would
            // fault each page twice, the second time with a TLB flush on
            // every core (an interrupt to each, which costs a VM exit).
            let beta = if k == l { 0.0 } else { 1.0 };
            add_gram(c.slice(s![..rows, ..]), beta, &mut gram);
            general_mat_mul(
                1.0,
                &shift.slice(s![..moved, ..]).t(),
                &c.slice(s![..moved, ..]),
                beta,
                &mut shifts,
            );
        }
        // `dsyrk` filled the upper triangle.
        for i in 0..d {
            for j in 0..i {
                gram[[i, j]] = gram[[j, i]];
            }
        }
        Ok((gram, shifts))
    };
    let mut sums = in_parallel(lanes, lane);
    sums.sort_by_key(|(l, _)| *l);
    // The sums added in lane order onto the first lane's (not onto zeros:
    // see the first chunk's β above).
    let mut total: Option<(Array2<f64>, Array2<f64>)> = None;
    let mut first_bad: Option<(usize, EditError)> = None;
    for (_, sum) in sums {
        match (sum, &mut total) {
            (Ok((g, p)), Some((gram, shifts))) => {
                *gram += &g;
                *shifts += &p;
            }
            (Ok(first), None) => total = Some(first),
            // The first bad row in row order, whichever lane met it.
            (Err((k, e)), _) if first_bad.as_ref().is_none_or(|(j, _)| k < *j) => {
                first_bad = Some((k, e));
            }
            (Err(_), _) => {}
        }
    }
    if let Some((_, e)) = first_bad {
        return Err(e);
    }
    Ok(total.unwrap_or_else(|| (Array2::zeros((d, d)), Array2::zeros((d, d)))))
}

/// `gram` ← β·`gram` + xᵀ·x for x `[k, d]` (standard layout), upper
/// triangle only (BLAS `dsyrk`; β = 0 does not read `gram`).
fn add_gram(x: ArrayView2<'_, f64>, beta: f64, gram: &mut Array2<f64>) {
    let (k, d) = x.dim();
    assert!(x.is_standard_layout() && gram.is_standard_layout() && gram.dim() == (d, d));
    let (Ok(n), Ok(k)) = (std::ffi::c_int::try_from(d), std::ffi::c_int::try_from(k)) else {
        panic!("dsyrk of {k} × {d}: larger than BLAS's 32-bit sizes");
    };
    // SAFETY: x holds k×d values with leading dimension d, gram d×d with
    // leading dimension d; BLAS writes only gram's upper triangle.
    unsafe {
        cblas_dsyrk(
            CBLAS_ROW_MAJOR,
            CBLAS_UPPER,
            CBLAS_TRANS,
            n,
            k,
            1.0,
            x.as_ptr(),
            n,
            beta,
            gram.as_mut_ptr(),
            n,
        );
    }
}

/// `row` ← `from` widened to f64, element by element (no temporary).
fn widen_into<T: Copy + Into<f64>>(
    row: &mut ndarray::ArrayViewMut1<'_, f64>,
    from: ndarray::ArrayView1<'_, T>,
) {
    Zip::from(row).and(from).for_each(|r, &v| *r = v.into());
}

fn check_finite(
    row: ndarray::ArrayView1<'_, f64>,
    what: &'static str,
    pair: usize,
    position: usize,
) -> Result<(), EditError> {
    if row.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(EditError::NonFinite {
            what,
            pair,
            position,
        })
    }
}

/// CBLAS's `CblasRowMajor`, `CblasUpper` and `CblasTrans`.
const CBLAS_ROW_MAJOR: std::ffi::c_int = 101;
const CBLAS_UPPER: std::ffi::c_int = 121;
const CBLAS_TRANS: std::ffi::c_int = 112;

unsafe extern "C" {
    /// C ← α·op(A)·op(A)ᵀ + β·C on one triangle of C (CBLAS, in OpenBLAS).
    fn cblas_dsyrk(
        order: std::ffi::c_int,
        uplo: std::ffi::c_int,
        trans: std::ffi::c_int,
        n: std::ffi::c_int,
        k: std::ffi::c_int,
        alpha: f64,
        a: *const f64,
        lda: std::ffi::c_int,
        beta: f64,
        c: *mut f64,
        ldc: std::ffi::c_int,
    );
    /// OpenBLAS's thread count for the LAPACK and BLAS calls that follow.
    fn openblas_set_num_threads(n: std::ffi::c_int);
    /// LAPACK: solves A·X = B with A's Cholesky factor (column-major), in
    /// OpenBLAS, which ndarray-linalg links. Declared as lapack-sys declares
    /// it: without gfortran's hidden length of `uplo`, which a CHARACTER*1
    /// argument never reads.
    fn dpotrs_(
        uplo: *const std::ffi::c_char,
        n: *const std::ffi::c_int,
        nrhs: *const std::ffi::c_int,
        a: *const f64,
        lda: *const std::ffi::c_int,
        b: *mut f64,
        ldb: *const std::ffi::c_int,
        info: *mut std::ffi::c_int,
    );
}

/// Runs OpenBLAS on one thread from now on. How many threads a Cholesky or
/// QR factorisation is split over changes its result by a few ulps, and an
/// operator's ulps reach the images (±1 in a few 8-bit pixels on the toy
/// model): one thread, whatever the machine or `OMP_NUM_THREADS`, makes an
/// edit the same everywhere, which is what lets shards of an evaluation run
/// on different machines merge into one run's report. The factorisations
/// are d × d (d ≤ 2048): milliseconds either way.
fn lapack_on_one_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: a plain setter of OpenBLAS, which ndarray-linalg links.
    ONCE.call_once(|| unsafe { openblas_set_num_threads(1) });
}

/// λI + xᵀ·x `[m, m] f64` for x `[n, m] f64`: with the rows c as x this is
/// M = λI + Σ c cᵀ.
fn regularized_gram(x: ArrayView2<'_, f64>, lambda: f64) -> Array2<f64> {
    let mut gram = blocked_gram(x);
    gram.diag_mut().mapv_inplace(|v| v + lambda);
    gram
}

/// Output rows per band of [`blocked_gram`], and
/// columns per block of [`solve_spd`]. Fixed, not derived from the core
/// count: how OpenBLAS rounds an element depends on the shape of the product
/// it is part of, so the bands must not change with the machine.
const BLOCK: usize = 128;

/// xᵀ·x `[m, m] f64` for x `[n, m]`: each band of [`BLOCK`] rows from its
/// diagonal rightwards as one product, mirrored below the diagonal
/// (symmetric: ~(b + 1)/2b of the work for b bands), the bands shared out
/// among one thread per core (OpenBLAS itself runs on one, see
/// [`lapack_on_one_thread`]); each element is one band's product whatever
/// the number of threads. The widest band comes first, so the last to
/// start is the narrowest.
fn blocked_gram(x: ArrayView2<'_, f64>) -> Array2<f64> {
    let m = x.ncols();
    let mut out = Array2::zeros((m, m));
    for (i, part) in in_parallel(m.div_ceil(BLOCK), |i| {
        column_block(x, i)
            .t()
            .dot(&x.slice(ndarray::s![.., i * BLOCK..]))
    }) {
        let (top, h) = (i * BLOCK, part.nrows());
        out.slice_mut(ndarray::s![top..top + h, top..])
            .assign(&part);
        out.slice_mut(ndarray::s![top + h.., top..top + h])
            .assign(&part.slice(ndarray::s![.., h..]).t());
    }
    out
}

/// Columns j·[`BLOCK`] … of x.
fn column_block(x: ArrayView2<'_, f64>, j: usize) -> ArrayView2<'_, f64> {
    let end = ((j + 1) * BLOCK).min(x.ncols());
    x.slice_move(ndarray::s![.., j * BLOCK..end])
}

/// `f(i)` for every task i < `tasks` (a band of rows, a running sum), on
/// one thread per core, each thread taking the next task in order when it
/// is free; the results with their tasks, in any order.
fn in_parallel<F, T>(tasks: usize, f: F) -> Vec<(usize, T)>
where
    F: Fn(usize) -> T + Sync,
    T: Send,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, tasks.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (f, next) = (&f, &next);
                s.spawn(move || {
                    std::iter::from_fn(|| {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (i < tasks).then(|| (i, f(i)))
                    })
                    .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            // A panic in a product is a bug: passed on as it is.
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// X = M⁻¹·B `[d, k] f64` for symmetric positive definite M `[d, d] f64`:
/// M = L·Lᵀ, then LAPACK's `dpotrs` on blocks of [`BLOCK`] columns of B,
/// the blocks on one thread per core (OpenBLAS itself on one thread, see
/// [`lapack_on_one_thread`]), straight on column-major copies where
/// ndarray-linalg's triangular solves copied each block twice more.
fn solve_spd(
    m: &Array2<f64>,
    b: ArrayView2<'_, f64>,
    lambda: f64,
) -> Result<Array2<f64>, EditError> {
    let failed = |source| EditError::NotPositiveDefinite { lambda, source };
    let l = m.cholesky(UPLO::Lower).map_err(failed)?;
    let (d, k) = b.dim();
    let too_large = || EditError::Shape {
        what: "system (larger than LAPACK's 32-bit sizes)",
        expected: vec![i32::MAX as usize, i32::MAX as usize],
        actual: vec![d, k],
    };
    let n = std::ffi::c_int::try_from(d).map_err(|_| too_large())?;
    std::ffi::c_int::try_from(k).map_err(|_| too_large())?;
    if d == 0 || k == 0 {
        return Ok(Array2::zeros((d, k)));
    }
    // LAPACK reads column-major: L's row-major values are Lᵀ (upper), and
    // Bᵀ's row-major values are B, where the solution Xᵀ comes back.
    let factor: Vec<f64> = l.iter().copied().collect();
    let mut rhs: Vec<f64> = b.t().iter().copied().collect();
    // Columns are solved in blocks of BLOCK, the blocks dealt out to one
    // thread per core: each column's solution is the same whatever the
    // thread count.
    let mut blocks: Vec<&mut [f64]> = rhs.chunks_mut(d * BLOCK).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, blocks.len());
    let mut shares: Vec<Vec<&mut [f64]>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, block) in blocks.drain(..).enumerate() {
        shares[i % threads].push(block);
    }
    let potrs = |block: &mut [f64]| {
        let mut info: std::ffi::c_int = 0;
        // Whole columns of d values: fits, as k does.
        let cols = (block.len() / d) as std::ffi::c_int;
        // SAFETY: `factor` holds n×n values and `block` n×cols, both with
        // leading dimension n; LAPACK writes only `block` and `info`.
        unsafe {
            dpotrs_(
                c"U".as_ptr(),
                &n,
                &cols,
                factor.as_ptr(),
                &n,
                block.as_mut_ptr(),
                &n,
                &mut info,
            );
        }
        info
    };
    let infos: Vec<std::ffi::c_int> = std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| scope.spawn(|| share.into_iter().map(potrs).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            // A panic in LAPACK's call is a bug: passed on as it is.
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    if let Some(&info) = infos.iter().find(|&&i| i != 0) {
        return Err(EditError::Lapack {
            routine: "dpotrs",
            info,
        });
    }
    let xt = Array2::from_shape_vec((k, d), rhs).map_err(|_| too_large())?;
    Ok(xt.t().as_standard_layout().into_owned())
}

/// W'ᵀ = Aᵀ·Wᵀ `[d, out] f64` of an ONNX K/V weight Wᵀ `[d, out]` (f32 or
/// f64), the dense product the tests take as the reference for the edit
/// that [`Change::add_to`] makes in place.
#[cfg(test)]
impl Operator {
    fn apply_transposed<T: Copy + Into<f64>>(
        &self,
        wt: ArrayView2<'_, T>,
    ) -> Result<Array2<f64>, EditError> {
        let d = self.dim();
        if wt.nrows() != d {
            return Err(EditError::Shape {
                what: "transposed weight W^T",
                expected: vec![d, wt.ncols()],
                actual: vec![wt.nrows(), wt.ncols()],
            });
        }
        Ok(self.transposed().dot(&wt.mapv(Into::into)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, s};
    use ndarray_linalg::Inverse;
    use proptest::prelude::*;

    /// Random embeddings, maps, a weight W `[out, d]` and λ.
    #[derive(Debug, Clone)]
    struct Case {
        src: Array3<f64>,
        dst: Array3<f64>,
        maps: Vec<Vec<usize>>,
        w: Array2<f64>,
        lambda: f64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..=3, 1usize..=6, 1usize..=6, 1usize..=4).prop_flat_map(|(pairs, seq, d, out)| {
            let n = pairs * seq * d;
            (
                proptest::collection::vec(-1.0f64..1.0, n),
                proptest::collection::vec(-1.0f64..1.0, n),
                proptest::collection::vec(0..seq, pairs * seq),
                proptest::collection::vec(-1.0f64..1.0, out * d),
                0.01f64..10.0,
            )
                .prop_map(move |(src, dst, maps, w, lambda)| Case {
                    src: Array3::from_shape_vec((pairs, seq, d), src).unwrap(),
                    dst: Array3::from_shape_vec((pairs, seq, d), dst).unwrap(),
                    maps: maps.chunks(seq).map(<[usize]>::to_vec).collect(),
                    w: Array2::from_shape_vec((out, d), w).unwrap(),
                    lambda,
                })
        })
    }

    fn max_abs_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        (a - b).iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    #[test]
    fn blocked_gram_equals_the_plain_product() {
        // widths that are not multiples of the block, one below it
        for (n, m) in [(300, 200), (7, 90), (1, 257)] {
            let a = Array2::from_shape_fn((n, m), |(i, j)| ((i * 31 + j * 17) % 13) as f64 - 6.0);
            let g = blocked_gram(a.view());
            assert!(max_abs_diff(&g, &a.t().dot(&a)) < 1e-9);
            assert_eq!(g, g.t(), "symmetric exactly");
        }
    }

    /// Embeddings `[pairs, seq, d]` f32 whose destination repeats the source
    /// at the first `same` positions of every pair, and the identity maps.
    fn rows(pairs: usize, seq: usize, d: usize, same: usize) -> (Array3<f32>, Array3<f32>) {
        let src = Array3::from_shape_fn((pairs, seq, d), |(p, i, j)| {
            ((p * 131 + i * 31 + j * 17) % 23) as f32 / 7.0 - 1.5
        });
        let dst = Array3::from_shape_fn((pairs, seq, d), |(p, i, j)| {
            if i < same {
                src[[p, i, j]]
            } else {
                ((p * 7 + i * 13 + j * 5) % 19) as f32 / 5.0 - 2.0
            }
        });
        (src, dst)
    }

    #[test]
    fn dense_sums_equal_the_plain_products() {
        // one chunk, fewer chunks than lanes, more (the last one short)
        for (pairs, seq, d) in [(2, 77, 12), (9, 77, 40), (20, 77, 16)] {
            let (src, dst) = rows(pairs, seq, d, 5);
            let maps: Vec<Vec<usize>> = (0..pairs)
                .map(|p| (0..seq).map(|i| (i + p) % seq).collect())
                .collect();
            let (gram, shifts) = dense_sums(src.view(), dst.view(), &maps).unwrap();
            let (c, shift) = rows_and_shifts(src.view(), dst.view(), &maps).unwrap();
            assert!(max_abs_diff(&gram, &c.t().dot(&c)) < 1e-9);
            assert_eq!(gram, gram.t(), "symmetric exactly");
            assert!(max_abs_diff(&shifts, &shift.t().dot(&c)) < 1e-9);
        }
    }

    #[test]
    fn dense_sums_hold_when_a_lane_starts_with_no_moved_row() {
        // Chunk 0 (lane 0's first, written rather than added to) is rows
        // 0..512 of pairs that do not move at all; later pairs move.
        let (pairs, seq, d) = (12, 77, 16);
        let (src, mut dst) = rows(pairs, seq, d, 0);
        for p in 0..7 {
            dst.slice_mut(s![p, .., ..])
                .assign(&src.slice(s![p, .., ..]));
        }
        let maps: Vec<Vec<usize>> = (0..pairs).map(|_| (0..seq).collect()).collect();
        let (gram, shifts) = dense_sums(src.view(), dst.view(), &maps).unwrap();
        let (c, shift) = rows_and_shifts(src.view(), dst.view(), &maps).unwrap();
        assert!(max_abs_diff(&gram, &c.t().dot(&c)) < 1e-9);
        assert!(max_abs_diff(&shifts, &shift.t().dot(&c)) < 1e-9);
        assert!(shifts.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn dense_sums_name_the_first_bad_row_whichever_lane_meets_it() {
        let (mut src, mut dst) = rows(20, 77, 8, 0);
        // rows 800 (chunk 3, lane 3) and 1300 (chunk 5, lane 1)
        src[[10, 30, 0]] = f32::INFINITY;
        dst[[16, 68, 2]] = f32::NAN;
        let maps = vec![(0..77).collect::<Vec<_>>(); 20];
        match dense_sums(src.view(), dst.view(), &maps) {
            Err(EditError::NonFinite {
                what: "source",
                pair: 10,
                position: 30,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// The reference's formula, literally: W' = (λW + Σ (W c*) cᵀ)(λI + Σ c cᵀ)⁻¹.
    fn naive_edit(case: &Case) -> Array2<f64> {
        let (pairs, seq, d) = case.src.dim();
        let mut mat1 = &case.w * case.lambda;
        let mut mat2 = Array2::<f64>::eye(d) * case.lambda;
        for p in 0..pairs {
            for i in 0..seq {
                let c = case.src.slice(s![p, i, ..]);
                let c_star = case.dst.slice(s![p, case.maps[p][i], ..]);
                let v_star = case.w.dot(&c_star);
                for r in 0..v_star.len() {
                    for k in 0..d {
                        mat1[[r, k]] += v_star[r] * c[k];
                    }
                }
                for a in 0..d {
                    for b in 0..d {
                        mat2[[a, b]] += c[a] * c[b];
                    }
                }
            }
        }
        mat1.dot(&mat2.inv().unwrap())
    }

    /// UCE's formula, literally: W' = (λW + Σ (W c*) cᵀ + s Σ W cₚcₚᵀ)
    /// (λI + Σ c cᵀ + s Σ cₚcₚᵀ)⁻¹, from the preserved rows cₚ themselves.
    fn naive_preserving_edit(case: &Case, kept: &Array2<f64>, scale: f64) -> Array2<f64> {
        let (pairs, seq, d) = case.src.dim();
        let mut mat1 = &case.w * case.lambda;
        let mut mat2 = Array2::<f64>::eye(d) * case.lambda;
        let mut add = |c: ndarray::ArrayView1<f64>, target: ndarray::ArrayView1<f64>, s: f64| {
            let v = case.w.dot(&target);
            for r in 0..v.len() {
                for k in 0..d {
                    mat1[[r, k]] += s * v[r] * c[k];
                }
            }
            for a in 0..d {
                for b in 0..d {
                    mat2[[a, b]] += s * c[a] * c[b];
                }
            }
        };
        for p in 0..pairs {
            for i in 0..seq {
                let c = case.src.slice(s![p, i, ..]);
                add(c, case.dst.slice(s![p, case.maps[p][i], ..]), 1.0);
            }
        }
        for c in kept.rows() {
            add(c, c, scale);
        }
        mat1.dot(&mat2.inv().unwrap())
    }

    proptest! {
        #[test]
        fn preservation_matches_uce_formula(
            case in case(),
            kept in proptest::collection::vec(-1.0f64..1.0, 36),
            scale in 0.0f64..5.0,
        ) {
            let d = case.src.dim().2;
            let kept = Array2::from_shape_vec((6, 6), kept).unwrap().slice(s![.., ..d]).to_owned();
            let gram = kept.t().dot(&kept);
            let preserve = Preservation { gram: gram.view(), scale };
            let op = solve_preserving(case.src.view(), case.dst.view(), &case.maps, case.lambda,
                Some(preserve)).unwrap();
            let mut wt = case.w.t().to_owned();
            op.change().add_to(wt.view_mut());
            let naive = naive_preserving_edit(&case, &kept, scale).reversed_axes();
            let scale = naive.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            prop_assert!(max_abs_diff(&wt, &naive) <= 1e-8 * scale,
                "diff {}", max_abs_diff(&wt, &naive));
        }

        #[test]
        fn matches_the_reference_formula(case in case()) {
            let op = solve(case.src.view(), case.dst.view(), &case.maps, case.lambda).unwrap();
            let edited = op.apply_transposed(case.w.t()).unwrap().reversed_axes();
            let naive = naive_edit(&case);
            let scale = naive.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            prop_assert!(max_abs_diff(&edited, &naive) <= 1e-9 * scale,
                "diff {}", max_abs_diff(&edited, &naive));
        }

        #[test]
        fn the_change_in_either_form_matches_the_reference_formula(case in case()) {
            let op = solve(case.src.view(), case.dst.view(), &case.maps, case.lambda).unwrap();
            let mut wt = case.w.t().to_owned();
            let z = op.change().add_to(wt.view_mut());
            let naive = naive_edit(&case).reversed_axes();
            let scale = naive.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            prop_assert!(max_abs_diff(&wt, &naive) <= 1e-9 * scale,
                "diff {}", max_abs_diff(&wt, &naive));
            // ‖Z‖ is the size of the change.
            let moved = (&naive - &case.w.t()).mapv(|x| x * x).sum().sqrt();
            prop_assert!((z.mapv(|x| x * x).sum().sqrt() - moved).abs() <= 1e-9 * (1.0 + moved));
        }

        #[test]
        fn huge_lambda_changes_nothing(case in case()) {
            let op = solve(case.src.view(), case.dst.view(), &case.maps, 1e12).unwrap();
            let eye = Array2::eye(op.dim());
            prop_assert!(max_abs_diff(&op.transposed().to_owned(), &eye) < 1e-9);
        }

        #[test]
        fn same_prompt_is_a_no_op(case in case()) {
            let seq = case.src.dim().1;
            let identity: Vec<Vec<usize>> = case.maps.iter().map(|_| (0..seq).collect()).collect();
            let op = solve(case.src.view(), case.src.view(), &identity, case.lambda).unwrap();
            let eye = Array2::eye(op.dim());
            prop_assert!(max_abs_diff(&op.transposed().to_owned(), &eye) < 1e-10);
        }

        #[test]
        fn composing_equals_applying_twice(first in case(), second_dst in proptest::collection::vec(-1.0f64..1.0, 216)) {
            let first_op = solve(first.src.view(), first.dst.view(), &first.maps, first.lambda).unwrap();
            let dst2 = Array3::from_shape_vec(first.dst.raw_dim(),
                second_dst[..first.dst.len()].to_vec()).unwrap();
            let second_op = solve(first.src.view(), dst2.view(), &first.maps, first.lambda).unwrap();
            let wt = first.w.t();
            let twice = second_op.apply_transposed(first_op.apply_transposed(wt).unwrap().view()).unwrap();
            let composed = first_op.then(&second_op).unwrap().apply_transposed(wt).unwrap();
            let scale = twice.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            prop_assert!(max_abs_diff(&twice, &composed) <= 1e-12 * scale);
        }
    }

    fn small() -> (Array3<f32>, Array3<f32>, Vec<Vec<usize>>) {
        let src = Array3::from_shape_fn((1, 3, 2), |(_, i, k)| (i + 2 * k) as f32 * 0.25);
        let dst = Array3::from_shape_fn((1, 3, 2), |(_, i, k)| (i * k) as f32 * 0.5 - 0.2);
        (src, dst, vec![vec![0, 2, 2]])
    }

    #[test]
    fn f32_and_f64_inputs_agree() {
        let (src, dst, maps) = small();
        let a32 = solve(src.view(), dst.view(), &maps, 0.1).unwrap();
        let a64 = solve(
            src.mapv(f64::from).view(),
            dst.mapv(f64::from).view(),
            &maps,
            0.1,
        )
        .unwrap();
        assert_eq!(a32, a64);
    }

    /// CLIP-like embeddings at d = 96: a large shared first position, the
    /// rest correlated, the destination moved from position 4 on.
    fn clip_like(pairs: usize, seq: usize, d: usize) -> (Array3<f64>, Array3<f64>) {
        let wave = |p: usize, i: usize, k: usize, f: f64| {
            ((p * 7 + i * 3 + k) as f64 * f).sin() + 0.3 * ((k * k) as f64 * 0.01).cos()
        };
        let src = Array3::from_shape_fn((pairs, seq, d), |(p, i, k)| {
            if i == 0 {
                28.0 * ((k as f64) * 0.37).sin()
            } else {
                wave(p, i, k, 0.11)
            }
        });
        let mut dst = src.clone();
        for ((_, i, _), v) in dst.indexed_iter_mut() {
            if i >= 4 {
                *v += 0.5 * ((i as f64) * 0.7 + *v).cos();
            }
        }
        (src, dst)
    }

    #[test]
    fn few_moved_positions_are_factored_and_exact_in_f32() {
        let (pairs, seq, d) = (2, 16, 96);
        let (src, dst) = clip_like(pairs, seq, d);
        let identity: Vec<Vec<usize>> = (0..pairs).map(|_| (0..seq).collect()).collect();
        let op = solve(src.view(), dst.view(), &identity, 0.1).unwrap();
        let change = op.change();
        // 2 × 12 moved positions: rank 24 < d / 2.
        assert!(change.basis.as_ref().is_some_and(|p| p.ncols() == 24));
        let w = Array2::from_shape_fn((40, d), |(o, k)| ((o * d + k) as f64 * 0.013).sin() * 0.05);
        let exact = op.apply_transposed(w.t()).unwrap();
        let mut wt = w.t().mapv(|x| x as f32);
        change.map(|x| x as f32).add_to(wt.view_mut());
        let scale = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = max_abs_diff(&wt.mapv(f64::from), &exact) / scale;
        assert!(
            err < 1e-6,
            "f32 factored edit off by {err:e} of the largest weight"
        );
    }

    #[test]
    fn lambda_must_be_finite_and_positive() {
        let (src, dst, maps) = small();
        for lambda in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = solve(src.view(), dst.view(), &maps, lambda).unwrap_err();
            assert!(
                matches!(err, EditError::BadLambda { .. }),
                "{lambda}: {err}"
            );
        }
    }

    #[test]
    fn shape_errors_name_the_array() {
        let (src, dst, maps) = small();
        let short = dst.slice(s![.., ..2, ..]);
        let err = solve(src.view(), short, &maps, 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::Shape {
                    what: "destination embeddings",
                    ..
                }
            ),
            "{err}"
        );
        let err = solve(src.view(), dst.view(), &[], 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::Shape {
                    what: "index maps",
                    ..
                }
            ),
            "{err}"
        );
        let err = solve(src.view(), dst.view(), &[vec![0, 1]], 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::Shape {
                    what: "index map",
                    ..
                }
            ),
            "{err}"
        );
        let err = solve(src.view(), dst.view(), &[vec![0, 1, 3]], 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::IndexOutOfRange {
                    pair: 0,
                    position: 2,
                    index: 3,
                    seq_len: 3
                }
            ),
            "{err}"
        );
        let empty = Array3::<f32>::zeros((1, 3, 0));
        let err = solve(empty.view(), empty.view(), &maps, 0.1).unwrap_err();
        assert!(matches!(err, EditError::Shape { .. }), "{err}");
    }

    #[test]
    fn non_finite_embeddings_are_rejected() {
        let (mut src, dst, maps) = small();
        src[[0, 1, 0]] = f32::NAN;
        let err = solve(src.view(), dst.view(), &maps, 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::NonFinite {
                    what: "source",
                    pair: 0,
                    position: 1
                }
            ),
            "{err}"
        );
        let (src, mut dst, maps) = small();
        dst[[0, 2, 1]] = f32::INFINITY;
        let err = solve(src.view(), dst.view(), &maps, 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::NonFinite {
                    what: "destination",
                    pair: 0,
                    position: 2
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn preservation_is_checked() {
        let (src, dst, maps) = small();
        let gram = Array2::<f64>::eye(2);
        let run = |gram: ArrayView2<'_, f64>, scale| {
            solve_preserving(
                src.view(),
                dst.view(),
                &maps,
                0.1,
                Some(Preservation { gram, scale }),
            )
        };
        for scale in [-1.0, f64::NAN, f64::INFINITY] {
            let err = run(gram.view(), scale).unwrap_err();
            assert!(matches!(err, EditError::BadPreserveScale { .. }), "{err}");
        }
        let wide = Array2::<f64>::eye(3);
        let err = run(wide.view(), 0.1).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::Shape {
                    what: "preservation prior",
                    ..
                }
            ),
            "{err}"
        );
        let mut bad = gram.clone();
        bad[[0, 0]] = f64::NAN;
        let err = run(bad.view(), 0.1).unwrap_err();
        assert!(matches!(err, EditError::NonFinitePrior), "{err}");
        // Scale 0 is the plain edit.
        assert_eq!(
            run(gram.view(), 0.0).unwrap(),
            solve(src.view(), dst.view(), &maps, 0.1).unwrap()
        );
    }

    #[test]
    fn no_pairs_is_the_identity() {
        let empty = Array3::<f64>::zeros((0, 77, 4));
        let op = solve(empty.view(), empty.view(), &[], 0.1).unwrap();
        assert_eq!(op, Operator::identity(4));
    }

    #[test]
    fn apply_checks_the_weight_width() {
        let op = Operator::identity(3);
        let wt = Array2::<f32>::zeros((4, 5));
        let err = op.apply_transposed(wt.view()).unwrap_err();
        assert!(
            matches!(
                err,
                EditError::Shape {
                    what: "transposed weight W^T",
                    ..
                }
            ),
            "{err}"
        );
        let wt = Array2::<f32>::ones((3, 5));
        assert_eq!(
            op.apply_transposed(wt.view()).unwrap(),
            Array2::<f64>::ones((3, 5))
        );
        assert!(Operator::from_transposed(Array2::zeros((2, 3))).is_err());
        assert!(Operator::identity(2).then(&Operator::identity(3)).is_err());
    }
}
