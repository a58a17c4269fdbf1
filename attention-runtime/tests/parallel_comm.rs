//! The communicators without a GPU: every collective of [`InProcessComm`] on 1 to 4 ranks
//! (exact values, the same bits on every rank), its failure modes (a peer that times out,
//! one that is gone, ranks calling different collectives or sizes, a panicking rank, bad
//! buffers), `cp_comm_type` parsing, and the NCCL side that needs no GPU (the library probe,
//! the unique id's hex, file and environment forms).

mod parallel_common;

use std::time::{Duration, Instant};

use attention_runtime::parallel::{
    nccl_version, run_ranks, Communicator, CpCommType, InProcessComm, NcclUniqueId,
};
use attention_runtime::{AttnError, Tensor};
use parallel_common::ranks;

fn t(v: Vec<f32>) -> Tensor {
    Tensor::new(&[v.len()], v).unwrap()
}

#[test]
fn collectives_give_exact_results_on_every_rank() {
    for n in 1..=4usize {
        let out = ranks(n, |c| {
            let r = c.rank() as f32;
            // all_reduce: rank r holds [r, 10 r + 0.1].
            let mut x = t(vec![r, 10.0 * r + 0.1]);
            c.all_reduce_sum(&mut x)?;
            // all_gather: rank r sends [r, r].
            let mut g = Tensor::zeros(&[2 * n]);
            c.all_gather(&t(vec![r, r]), &mut g)?;
            // reduce_scatter: rank r sends [r + j for j in 0..n] (one element per block).
            let mut rs = Tensor::zeros(&[1]);
            c.reduce_scatter_sum(&t((0..n).map(|j| r + j as f32).collect()), &mut rs)?;
            // all_to_all: rank r sends 100 r + j to rank j.
            let mut a = Tensor::zeros(&[n]);
            c.all_to_all(&t((0..n).map(|j| 100.0 * r + j as f32).collect()), &mut a)?;
            // ring: to r + 1, from r - 1.
            let mut ring = Tensor::zeros(&[1]);
            c.send_recv(
                &t(vec![r]),
                (c.rank() + 1) % n,
                &mut ring,
                (c.rank() + n - 1) % n,
            )?;
            let bytes = c.all_gather_bytes(&vec![c.rank() as u8; c.rank() + 1])?;
            let b = c.broadcast_bytes(format!("from {}", c.rank()).as_bytes(), n - 1)?;
            Ok((x, g, rs, a, ring, bytes, b))
        });
        let sum_r: f32 = (0..n).map(|r| r as f32).sum();
        let sum_x1 = (0..n).map(|r| (10.0 * r as f32 + 0.1) as f64).sum::<f64>() as f32;
        for (rank, (x, g, rs, a, ring, bytes, b)) in out.iter().enumerate() {
            assert_eq!(x.data(), &[sum_r, sum_x1], "all_reduce n={n}");
            let want_g: Vec<f32> = (0..n).flat_map(|r| [r as f32, r as f32]).collect();
            assert_eq!(g.data(), want_g.as_slice(), "all_gather n={n}");
            assert_eq!(
                rs.data(),
                &[sum_r + (n * rank) as f32],
                "reduce_scatter n={n}"
            );
            let want_a: Vec<f32> = (0..n).map(|i| 100.0 * i as f32 + rank as f32).collect();
            assert_eq!(a.data(), want_a.as_slice(), "all_to_all n={n}");
            assert_eq!(ring.data(), &[((rank + n - 1) % n) as f32], "ring n={n}");
            let want_b: Vec<Vec<u8>> = (0..n).map(|r| vec![r as u8; r + 1]).collect();
            assert_eq!(bytes, &want_b, "all_gather_bytes n={n}");
            assert_eq!(b, format!("from {}", n - 1).as_bytes(), "broadcast n={n}");
        }
        // The same bits on every rank.
        for o in &out[1..] {
            assert_eq!(o.0.data(), out[0].0.data());
        }
    }
}

fn collective_err(e: &AttnError) -> (String, usize, String, String) {
    match e {
        AttnError::Collective {
            op,
            rank,
            expected,
            got,
        } => (op.clone(), *rank, expected.clone(), got.clone()),
        other => panic!("expected a Collective error, got {other}"),
    }
}

#[test]
fn a_peer_that_never_comes_is_a_timeout_not_a_hang() {
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    let out = run_ranks(2, timeout, |c| {
        if c.rank() == 1 {
            // Holds its communicator past rank 0's timeout without calling anything.
            std::thread::sleep(Duration::from_millis(800));
            return Ok(());
        }
        let mut x = t(vec![1.0]);
        c.all_reduce_sum(&mut x)
    })
    .unwrap();
    let (op, rank, expected, got) = collective_err(out[0].as_ref().unwrap_err());
    assert_eq!((op.as_str(), rank), ("all_reduce", 0));
    assert!(
        expected.contains("rank 1") && got.contains("timed out"),
        "{expected} / {got}"
    );
    assert!(out[1].is_ok());
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_peer_that_is_gone_is_an_error_at_once() {
    let out = run_ranks(3, Duration::from_secs(60), |c| {
        if c.rank() == 2 {
            return Err(AttnError::InvalidArgument {
                arg: "test".into(),
                expected: "nothing".into(),
                got: "rank 2 fails before the collective".into(),
            });
        }
        let mut g = Tensor::zeros(&[3]);
        c.all_gather(&t(vec![1.0]), &mut g)
    })
    .unwrap();
    // Each survivor names the peer it found gone: rank 2, or the other survivor when that
    // one failed first (because of rank 2) and dropped its communicator in turn. The first
    // survivor to fail can only have found rank 2 gone, so at least one names it.
    let mut names_rank2 = false;
    for (r, res) in out.iter().take(2).enumerate() {
        let (op, rank, _, got) = collective_err(res.as_ref().unwrap_err());
        assert_eq!((op.as_str(), rank), ("all_gather", r));
        let other = 1 - r;
        assert!(
            got.contains("rank 2 dropped its communicator")
                || got.contains(&format!("rank {other} dropped its communicator")),
            "{got}"
        );
        names_rank2 |= got.contains("rank 2 dropped");
    }
    assert!(names_rank2, "{out:?}");
}

#[test]
fn ranks_calling_different_collectives_or_sizes_are_errors() {
    let out = run_ranks(2, Duration::from_secs(60), |c| {
        if c.rank() == 0 {
            c.all_reduce_sum(&mut t(vec![1.0]))
        } else {
            c.all_gather(&t(vec![1.0]), &mut Tensor::zeros(&[2]))
        }
    })
    .unwrap();
    let (_, _, expected, got) = collective_err(out[0].as_ref().unwrap_err());
    assert!(
        expected.contains("all_reduce") && got.contains("all_gather"),
        "{expected} / {got}"
    );
    let (_, _, expected, got) = collective_err(out[1].as_ref().unwrap_err());
    assert!(
        expected.contains("all_gather") && got.contains("all_reduce"),
        "{expected} / {got}"
    );

    let out = run_ranks(2, Duration::from_secs(60), |c| {
        let n = 2 + c.rank();
        c.all_reduce_sum(&mut Tensor::zeros(&[n]))
    })
    .unwrap();
    let (_, _, expected, got) = collective_err(out[0].as_ref().unwrap_err());
    assert!(
        expected.contains("2 elements") && got.contains("3 elements"),
        "{expected} / {got}"
    );
}

#[test]
fn a_panicking_rank_is_an_error_and_its_peers_do_not_wait() {
    let start = Instant::now();
    let out = run_ranks(2, Duration::from_secs(60), |c| {
        if c.rank() == 1 {
            panic!("rank 1 panics on purpose");
        }
        c.all_reduce_sum(&mut t(vec![1.0]))
    })
    .unwrap();
    let (op, rank, _, got) = collective_err(out[1].as_ref().unwrap_err());
    assert_eq!(
        (op.as_str(), rank, got.as_str()),
        ("run_ranks", 1, "a panic")
    );
    let (_, _, _, got) = collective_err(out[0].as_ref().unwrap_err());
    assert!(got.contains("dropped"), "{got}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn bad_buffers_and_peers_are_typed_errors_before_anything_is_sent() {
    let comms = InProcessComm::group(2, Duration::from_millis(100)).unwrap();
    let c = &comms[0];
    let e = c
        .all_gather(&t(vec![1.0]), &mut Tensor::zeros(&[3]))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "recv"),
        "{e}"
    );
    let e = c
        .reduce_scatter_sum(&t(vec![1.0; 3]), &mut Tensor::zeros(&[1]))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "send"),
        "{e}"
    );
    let e = c
        .all_to_all(&t(vec![1.0; 4]), &mut Tensor::zeros(&[3]))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "recv"),
        "{e}"
    );
    let e = c
        .send_recv(&t(vec![1.0]), 2, &mut Tensor::zeros(&[1]), 1)
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "to"),
        "{e}"
    );
    let e = c.broadcast_bytes(b"x", 5).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "root"),
        "{e}"
    );
    let e = InProcessComm::group(0, Duration::from_millis(1)).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "world_size"),
        "{e}"
    );
}

#[test]
fn cp_comm_type_parses_megatron_names() {
    for ty in CpCommType::ALL {
        assert_eq!(ty.name().parse::<CpCommType>().unwrap(), ty);
    }
    let e = "a2a+p2p".parse::<CpCommType>().unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "cp_comm_type"),
        "{e}"
    );
}

#[test]
fn nccl_probe_is_a_typed_result_never_a_panic() {
    match nccl_version() {
        // A machine with libnccl: a real version code (2.7 or later).
        Ok(v) => assert!(v >= 2700, "{v}"),
        Err(AttnError::BackendUnavailable(msg)) => assert!(msg.contains("nccl"), "{msg}"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

#[test]
fn nccl_unique_id_round_trips_through_hex_env_and_file() {
    let hex: String = (0..128u32)
        .map(|i| format!("{:02x}", (i * 37 + 5) % 256))
        .collect();
    let id = NcclUniqueId::from_hex(&format!("  {hex}\n")).unwrap();
    assert_eq!(id.to_hex(), hex);
    for bad in ["", "zz", &hex[..254], &format!("{}zz", &hex[..254])] {
        let e = NcclUniqueId::from_hex(bad).unwrap_err();
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "nccl_id"),
            "{e}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nccl_id");
    let e = NcclUniqueId::read_file(&path, Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(&e, AttnError::Collective { op, .. } if op == "read nccl id"),
        "{e}"
    );
    // A reader that starts first sees the id once rank 0 writes it.
    let reader = std::thread::spawn({
        let path = path.clone();
        move || NcclUniqueId::read_file(&path, Duration::from_secs(30))
    });
    std::thread::sleep(Duration::from_millis(50));
    id.write_file(&path).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), id);
    let var = "ATTN_TEST_NCCL_ID_UNSET_VARIABLE";
    let e = NcclUniqueId::from_env(var).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == var),
        "{e}"
    );
}
