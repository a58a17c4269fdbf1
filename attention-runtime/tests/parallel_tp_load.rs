//! Tensor-parallel weights: the shard plan (whole groups per rank, replicated groups), a
//! whole checkpoint sharded at load time, per-rank `mp_rank_0N` shard files (written,
//! reloaded, a rank given another rank's or another world size's file), the divisibility
//! errors, and `run_realtime_tests` (q/k norm digests compared across ranks, one flipped bit
//! on one rank).

mod parallel_common;

use attention_runtime::backend::{BackendLayer, CpuLayer};
use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::realtime::run_realtime_tests;
use attention_runtime::parallel::tp_load::{
    load_mp_rank, load_tp_rank, mp_rank_path, save_mp_rank_shards, shard_layer,
};
use attention_runtime::parallel::{Communicator, TpLayer, TpPlan};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Tensor, WeightStore};
use parallel_common::{assert_close, config, layer, rand_t, ranks};

const GQA: &str =
    "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=layer, rope, qkv_bias, mask=causal";
const PREFIX: &str = "decoder.layers.0.self_attention.";

#[test]
fn plans_own_whole_groups_or_replicate_them() {
    let cfg = config("self, heads=8, gqa=2, head_dim=4, hidden=16, output_gate, mask=causal");
    // tp = 2: one whole group each; group g's rows are (4 q + 4 gate + 1 k + 1 v) * hn.
    let p = TpPlan::new(&cfg, 1, 2).unwrap();
    assert_eq!(
        (
            p.heads_per_rank,
            p.groups_per_rank,
            p.first_head,
            p.first_group,
            p.group_replicas
        ),
        (4, 1, 4, 1, 1)
    );
    assert_eq!(p.qkv_rows(&cfg), vec![40..56, 56..72, 72..80]);
    // tp = 4: group 1 on ranks 2 and 3; rank 3 has its last 2 query heads (and gates), and a
    // copy of its key and value rows.
    let p = TpPlan::new(&cfg, 3, 4).unwrap();
    assert_eq!(
        (
            p.heads_per_rank,
            p.groups_per_rank,
            p.first_head,
            p.first_group,
            p.group_replicas
        ),
        (2, 1, 6, 1, 2)
    );
    assert_eq!(p.qkv_rows(&cfg), vec![48..56, 64..72, 72..80]);
    let local = p.config(&cfg).unwrap();
    assert_eq!(
        (local.heads, local.groups, local.hidden, local.softmax_scale),
        (2, 1, 16, cfg.softmax_scale)
    );
}

#[test]
fn divisibility_and_rank_errors_name_the_argument() {
    let cfg = config("self, heads=6, gqa=3, head_dim=4, hidden=8, mask=causal");
    let cases = [
        (0, 4, "tp_size", "a divisor of heads = 6"),
        (0, 2, "tp_size", "groups = 3"),
        (3, 3, "tp_rank", "below tp_size = 3"),
        (0, 0, "tp_size", "heads"),
    ];
    for (rank, tp, arg, needle) in cases {
        match TpPlan::new(&cfg, rank, tp).unwrap_err() {
            AttnError::InvalidArgument {
                arg: a,
                expected,
                got,
            } => {
                assert_eq!(a, arg);
                assert!(expected.contains(needle), "{expected}");
                assert_eq!(got, if arg == "tp_rank" { rank } else { tp }.to_string());
            }
            other => panic!("{other}"),
        }
    }
    // A tensor of the wrong whole shape, and an unknown name.
    let p = TpPlan::new(&cfg, 0, 3).unwrap();
    let e = p
        .shard(&cfg, "linear_proj.weight", "k", &Tensor::zeros(&[8, 8]))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::WeightShape { key, .. } if key == "k"),
        "{e}"
    );
    let e = p
        .shard(&cfg, "linear_proj.scale", "k", &Tensor::zeros(&[8]))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "k"),
        "{e}"
    );
}

#[test]
fn checkpoint_sharded_at_load_time_and_shard_files_give_the_same_layer() {
    let full = layer(GQA, 11);
    let cfg = full.config().clone();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("model.safetensors");
    WeightStore::save(&whole, &full.state_dict(PREFIX)).unwrap();
    let store = WeightStore::from_file(&whole).unwrap();
    let paths = save_mp_rank_shards(&full, dir.path(), PREFIX, 2).unwrap();
    assert_eq!(
        paths,
        vec![mp_rank_path(dir.path(), 0), mp_rank_path(dir.path(), 1)]
    );
    let mut rng = SplitMix64::new(3);
    let x = rand_t(&mut rng, &[4, 2, 16], 1.0);
    let want = full.forward(&x, &ForwardArgs::default()).unwrap().output;
    let out = ranks(2, |c| {
        let r = c.rank();
        let sharded = shard_layer(&full, r, 2)?;
        let at_load = load_tp_rank(&cfg, &store, PREFIX, r, 2)?;
        let file = load_mp_rank(&cfg, &WeightStore::from_file(&paths[r])?, PREFIX, r, 2)?;
        assert_eq!(at_load.state_dict(PREFIX), sharded.state_dict(PREFIX));
        assert_eq!(file.state_dict(PREFIX), sharded.state_dict(PREFIX));
        let file_meta = WeightStore::from_file(&paths[r])?;
        assert_eq!(file_meta.metadata().get("tp_rank"), Some(&r.to_string()));
        TpLayer::new(CpuLayer::new(file), c, &cfg, false)?.forward(&x, &ForwardArgs::default())
    });
    for (r, y) in out.iter().enumerate() {
        assert_close(&format!("rank {r} from its mp_rank file"), y, &want);
    }
}

#[test]
fn a_rank_given_the_wrong_shard_is_an_error_naming_the_rank() {
    let full = layer(GQA, 12);
    let cfg = full.config().clone();
    let dir = tempfile::tempdir().unwrap();
    let paths = save_mp_rank_shards(&full, dir.path(), PREFIX, 2).unwrap();
    // Rank 0 handed rank 1's file (same shapes: only the metadata tells).
    let e = load_mp_rank(
        &cfg,
        &WeightStore::from_file(&paths[1]).unwrap(),
        PREFIX,
        0,
        2,
    )
    .unwrap_err();
    match &e {
        AttnError::Shard {
            rank,
            key,
            expected,
            got,
        } => {
            assert_eq!(
                (*rank, key.as_str(), expected.as_str()),
                (0, "__metadata__.tp_rank", "0")
            );
            assert!(got.starts_with('1'), "{got}");
        }
        other => panic!("{other}"),
    }
    // A file of another world size.
    let e = load_mp_rank(
        &cfg,
        &WeightStore::from_file(&paths[1]).unwrap(),
        PREFIX,
        1,
        4,
    )
    .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shard { rank: 1, key, .. } if key == "__metadata__.tp_size"),
        "{e}"
    );
    // Without metadata (a converted Megatron checkpoint): the shapes tell.
    let shard = shard_layer(&full, 1, 2).unwrap();
    let bare = WeightStore::from_tensors(shard.state_dict(PREFIX));
    let e = load_mp_rank(&cfg, &bare, PREFIX, 3, 4).unwrap_err();
    match &e {
        AttnError::Shard {
            rank,
            key,
            expected,
            got,
        } => {
            assert_eq!(*rank, 3);
            assert_eq!(key, &format!("{PREFIX}linear_qkv.weight"));
            assert!(
                expected.contains("[24, 16]") && expected.contains("tp_size = 4"),
                "{expected}"
            );
            assert_eq!(got, "[32, 16]");
        }
        other => panic!("{other}"),
    }
    // A missing tensor.
    let partial = WeightStore::from_tensors(shard.state_dict(PREFIX).into_iter().skip(1).collect());
    let e = load_mp_rank(&cfg, &partial, PREFIX, 1, 2).unwrap_err();
    assert!(matches!(&e, AttnError::MissingWeight { .. }), "{e}");
}

/// `layer` with bit 0 of element `idx` of parameter `name` flipped.
fn flip_bit(l: &SpecLayer, name: &str, idx: usize) -> SpecLayer {
    let sd: Vec<(String, Tensor)> = l
        .state_dict("")
        .into_iter()
        .map(|(k, mut t)| {
            if k == name {
                let v = &mut t.data_mut()[idx];
                *v = f32::from_bits(v.to_bits() ^ 1);
            }
            (k, t)
        })
        .collect();
    SpecLayer::load(l.config().clone(), &WeightStore::from_tensors(sd), "").unwrap()
}

#[test]
fn realtime_tests_find_one_flipped_bit_on_one_rank() {
    let full = layer(GQA, 13);
    // Equal copies: passes on every rank.
    let ok = ranks(3, |c| {
        let l = shard_layer(&full, c.rank() % 2, 2)?;
        run_realtime_tests(&c, &l)
    });
    assert_eq!(ok.len(), 3);
    for (bad_rank, name) in [(1, "q_layernorm.weight"), (2, "k_layernorm.bias")] {
        let out = ranks(3, |c| {
            let mut l = shard_layer(&full, c.rank() % 2, 2)?;
            if c.rank() == bad_rank {
                l = flip_bit(&l, name, 3);
            }
            Ok(run_realtime_tests(&c, &l).unwrap_err())
        });
        for e in out {
            match &e {
                AttnError::RankMismatch {
                    param,
                    rank,
                    expected,
                    got,
                } => {
                    assert_eq!((param.as_str(), *rank), (name, bad_rank));
                    assert_eq!(expected.len(), 64);
                    assert_ne!(expected, got);
                }
                other => panic!("{other}"),
            }
        }
    }
}

#[test]
fn realtime_tests_pass_without_norm_parameters() {
    let full = layer(
        "self, heads=2, head_dim=4, hidden=8, qk_layernorm=l2, mask=causal",
        14,
    );
    let out = ranks(2, |c| {
        run_realtime_tests(&c, &shard_layer(&full, c.rank(), 2)?)
    });
    assert_eq!(out.len(), 2);
    // A rank's layer has its own share of the heads.
    let l = shard_layer(&full, 1, 2).unwrap();
    assert_eq!(CpuLayer::new(l).layer_config().heads, 1);
}
