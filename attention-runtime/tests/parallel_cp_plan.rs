//! The GPU context-parallel plan ([`attention_runtime::parallel::cp_plan`]) checked on the
//! host: each planned launch is run by an emulation of the attention kernel (the packed mode's
//! virtual sequences; `Layer` = the bottom-right diagonal with the layer's visibility, `Full` =
//! every key, `Band` = the Toeplitz mask read as the kernel reads it, filler rows = no key),
//! partials merged by their LSE, and every rank's rows must equal attention over the whole
//! sequence in f64, for `p2p` (every ring step) and `all_gather`, CP = 1..4, causal / no mask
//! / sliding windows, one and several sequences. Also: the launch counts of the common
//! (causal, no window) case, and the row index tables against [`CpLayout`].

use attention_codegen::{MaskType, Window};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::cp_plan::{
    all_gather_jobs, batch_major_index, global_sources, head_merge_index, head_split_index,
    p2p_jobs, pack, KernelKind, Launch, Visibility,
};
use attention_runtime::parallel::CpLayout;
use attention_runtime::{AttnError, Tensor};

const D: usize = 3;

/// Rows of `D` values.
struct Rows(Vec<f64>);

impl Rows {
    fn row(&self, r: usize) -> &[f64] {
        &self.0[r * D..(r + 1) * D]
    }
}

/// Running output and LSE of the query rows.
struct Acc {
    out: Vec<f64>,
    lse: Vec<f64>,
}

impl Acc {
    fn new(rows: usize) -> Self {
        Acc {
            out: vec![0.0; rows * D],
            lse: vec![f64::NEG_INFINITY; rows],
        }
    }

    fn merge(&mut self, r: usize, o: &[f64], l: f64) {
        if l == f64::NEG_INFINITY {
            return;
        }
        let la = self.lse[r];
        let m = la.max(l);
        let (wa, wp) = ((la - m).exp(), (l - m).exp());
        for (x, y) in self.out[r * D..(r + 1) * D].iter_mut().zip(o) {
            *x = (*x * wa + y * wp) / (wa + wp);
        }
        self.lse[r] = m + (wa + wp).ln();
    }
}

/// Softmax attention of `q` over the `keys` (rows of `k` / `v`): output and LSE.
fn attend(q: &[f64], keys: &[usize], k: &Rows, v: &Rows) -> (Vec<f64>, f64) {
    if keys.is_empty() {
        return (vec![0.0; D], f64::NEG_INFINITY);
    }
    let s: Vec<f64> = keys
        .iter()
        .map(|&j| q.iter().zip(k.row(j)).map(|(a, b)| a * b).sum::<f64>())
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let tot: f64 = w.iter().sum();
    let mut o = vec![0.0; D];
    for (wi, &j) in w.iter().zip(keys) {
        for (x, y) in o.iter_mut().zip(v.row(j)) {
            *x += wi / tot * y;
        }
    }
    (o, m + tot.ln())
}

/// Run `launches` as the kernel would, merging into `acc`.
fn emulate(launches: &[Launch], vis: Visibility, q: &Rows, k: &Rows, v: &Rows, acc: &mut Acc) {
    for l in launches {
        assert_eq!(*l.cu_q.last().unwrap() as usize, l.q_rows.len(), "{l:?}");
        assert_eq!(*l.cu_k.last().unwrap() as usize, l.k_rows.len(), "{l:?}");
        let band = (l.kind == KernelKind::Band).then(|| l.band(vis));
        for it in 0..l.items() {
            let (q0, q1) = (l.cu_q[it] as usize, l.cu_q[it + 1] as usize);
            let (k0, k1) = (l.cu_k[it] as usize, l.cu_k[it + 1] as usize);
            assert!(q1 - q0 <= l.max_q);
            let (sq, sk) = ((q1 - q0) as i64, (k1 - k0) as i64);
            for i in 0..sq {
                let keys: Vec<usize> = (0..sk)
                    .filter(|&j| match l.kind {
                        KernelKind::Layer => vis.sees(j - (i + sk - sq)),
                        KernelKind::Full => true,
                        KernelKind::Band => {
                            let b = band.as_ref().unwrap();
                            let x = (b.offset as i64 + j - i) as usize;
                            assert!(x < b.width);
                            b.masked[it * b.width + x] == 0
                        }
                    })
                    .map(|j| l.k_rows.start + k0 + j as usize)
                    .collect();
                let row = l.q_rows.start + q0 + i as usize;
                let (o, lse) = attend(q.row(row), &keys, k, v);
                acc.merge(row, &o, lse);
            }
        }
    }
}

fn random_rows(rng: &mut SplitMix64, n: usize) -> Rows {
    Rows((0..n * D).map(|_| rng.uniform() as f64 * 2.0).collect())
}

fn vis_cases() -> Vec<(MaskType, Option<Window>)> {
    let w = |left, right| Some(Window { left, right });
    vec![
        (MaskType::Causal, None),
        (MaskType::NoMask, None),
        (MaskType::Causal, w(3, 0)),
        (MaskType::CausalBottomRight, w(7, 2)),
        (MaskType::Causal, w(5, -1)),
        (MaskType::NoMask, w(2, 3)),
        (MaskType::NoMask, w(-1, 2)),
        (MaskType::NoMask, w(4, -1)),
        (MaskType::NoMask, w(0, 0)),
        (MaskType::NoMask, w(100, 100)),
    ]
}

/// Rows of rank `r`'s local buffer, as global rows (sequences in `cu`).
fn local_rows(layout: CpLayout, cu: &[usize]) -> Vec<usize> {
    layout.local_rows("cu", cu).unwrap()
}

#[test]
fn plans_equal_whole_sequence_attention() {
    let mut rng = SplitMix64::new(5);
    for cp in 1..=4usize {
        let n = 2 * cp;
        for lens in [vec![n], vec![3 * n, n, 5 * n], vec![4 * n]] {
            let mut cu = vec![0usize];
            for l in &lens {
                cu.push(cu.last().unwrap() + l);
            }
            let total = *cu.last().unwrap();
            let local_cu: Vec<usize> = cu.iter().map(|x| x / cp).collect();
            let (q, k, v) = (
                random_rows(&mut rng, total),
                random_rows(&mut rng, total),
                random_rows(&mut rng, total),
            );
            // The global row and the sequence start of every row.
            let start: Vec<usize> = cu
                .windows(2)
                .flat_map(|w| std::iter::repeat_n(w[0], w[1] - w[0]))
                .collect();
            for (mask, window) in vis_cases() {
                let vis = Visibility::new(mask, window).unwrap();
                for r in 0..cp {
                    let layout = CpLayout::new(r, cp).unwrap();
                    let mine = local_rows(layout, &cu);
                    let pick = |x: &Rows, rows: &[usize]| {
                        Rows(rows.iter().flat_map(|&g| x.row(g).to_vec()).collect())
                    };
                    let ql = pick(&q, &mine);
                    let what = format!("cp={cp} rank={r} lens={lens:?} {mask:?} {window:?}");
                    // p2p: every rank's block, laid out as that rank holds it.
                    let mut acc = Acc::new(mine.len());
                    for src in 0..cp {
                        let theirs = local_rows(layout.of_rank(src), &cu);
                        let launches = pack(p2p_jobs(layout, &local_cu, src, vis)).unwrap();
                        emulate(
                            &launches,
                            vis,
                            &ql,
                            &pick(&k, &theirs),
                            &pick(&v, &theirs),
                            &mut acc,
                        );
                    }
                    let p2p = acc;
                    // all_gather: every key in sequence order.
                    let mut acc = Acc::new(mine.len());
                    let launches = pack(all_gather_jobs(layout, &local_cu, vis)).unwrap();
                    emulate(&launches, vis, &ql, &k, &v, &mut acc);
                    for (name, acc) in [("p2p", p2p), ("all_gather", acc)] {
                        for (i, &g) in mine.iter().enumerate() {
                            let s0 = start[g];
                            let s1 = cu[cu.iter().position(|&c| c == s0).unwrap() + 1];
                            let keys: Vec<usize> = (s0..s1)
                                .filter(|&j| vis.sees(j as i64 - g as i64))
                                .collect();
                            let (want, wl) = attend(q.row(g), &keys, &k, &v);
                            let got = &acc.out[i * D..(i + 1) * D];
                            let err = got
                                .iter()
                                .zip(&want)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f64::max);
                            assert!(err < 1e-9, "{name} {what} row {g}: {got:?} vs {want:?}");
                            assert!(
                                (acc.lse[i] - wl).abs() < 1e-9 || acc.lse[i] == wl,
                                "{name} {what} row {g}: lse {} vs {wl}",
                                acc.lse[i]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn causal_without_window_is_one_launch_per_ring_step() {
    let vis = Visibility::new(MaskType::Causal, None).unwrap();
    for cp in 1..=4usize {
        // Several sequences: still one launch (fillers keep cu_seqlens consecutive).
        let local_cu = [0usize, 2, 8, 12];
        for r in 0..cp {
            let layout = CpLayout::new(r, cp).unwrap();
            for src in 0..cp {
                let l = pack(p2p_jobs(layout, &local_cu, src, vis)).unwrap();
                assert_eq!(l.len(), 1, "cp={cp} rank={r} src={src}: {l:?}");
                let want = if src == r {
                    KernelKind::Layer
                } else {
                    KernelKind::Full
                };
                assert_eq!(l[0].kind, want);
            }
            // all_gather: one launch per local chunk, one when the two chunks are adjacent.
            let l = pack(all_gather_jobs(layout, &local_cu, vis)).unwrap();
            let want = if r == cp - 1 { 1 } else { 2 };
            assert_eq!(l.len(), want, "cp={cp} rank={r}: {l:?}");
            assert!(l.iter().all(|x| x.kind == KernelKind::Layer));
        }
    }
    // No mask: one Full launch per step and for all_gather.
    let vis = Visibility::new(MaskType::NoMask, None).unwrap();
    let layout = CpLayout::new(0, 2).unwrap();
    for src in 0..2 {
        let l = pack(p2p_jobs(layout, &[0, 4], src, vis)).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].kind, KernelKind::Full);
        assert_eq!(l[0].q_rows, 0..4);
    }
    let l = pack(all_gather_jobs(layout, &[0, 4], vis)).unwrap();
    assert_eq!((l.len(), l[0].k_rows.clone()), (1, 0..8));
}

#[test]
fn other_mask_types_are_typed_errors() {
    for m in [
        MaskType::Padding,
        MaskType::PaddingCausal,
        MaskType::Arbitrary,
    ] {
        match Visibility::new(m, None) {
            Err(AttnError::InvalidArgument { arg, .. }) => assert_eq!(arg, "mask_type"),
            r => panic!("{m:?}: {r:?}"),
        }
    }
}

#[test]
fn index_tables_match_the_layout() {
    let x = Tensor::from_fn(&[24, 1], |i| i as f32);
    let cu = [0i32, 8, 24];
    for cp in [1usize, 2, 4] {
        let local_cu: Vec<usize> = cu.iter().map(|&c| c as usize / cp).collect();
        let parts: Vec<Tensor> = (0..cp)
            .map(|r| CpLayout::new(r, cp).unwrap().split(&x, Some(&cu)).unwrap())
            .collect();
        let layout = CpLayout::new(0, cp).unwrap();
        let got: Vec<f32> = global_sources(layout, &local_cu)
            .into_iter()
            .map(|(r, i)| parts[r].data()[i])
            .collect();
        assert_eq!(got, x.data(), "cp={cp}");
    }
    // Head split / merge are inverse, and split blocks by head.
    let (rows, cp) = (3, 2);
    let split = head_split_index(rows, cp);
    assert_eq!(split, vec![0, 2, 4, 1, 3, 5]);
    let merge = head_merge_index(rows, cp);
    let back: Vec<usize> = merge.iter().map(|&m| split[m]).collect();
    assert_eq!(back, (0..rows * cp).collect::<Vec<_>>());
    // Padded [s, b] rows <-> batch-major.
    let fwd = batch_major_index(3, 2, false);
    assert_eq!(fwd, vec![0, 2, 4, 1, 3, 5]);
    let inv = batch_major_index(3, 2, true);
    let back: Vec<usize> = inv.iter().map(|&m| fwd[m]).collect();
    assert_eq!(back, (0..6).collect::<Vec<_>>());
}
