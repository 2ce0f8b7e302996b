//! Flag evaluation in process: one flag with a targeting rule plus
//! `fractional`, and a bulk evaluation of 20 such flags for one context,
//! beside the equivalent Unleash flags (flexible rollout 50 % with a
//! `plan IN [pro, team]` constraint) in `unleash-yggdrasil` 0.21, the engine
//! inside Unleash's SDKs and Edge, in the same process.
//!
//! `cargo bench -p flywheel-flags --bench evaluate` prints criterion's figures
//! and then the two ratios (Flywheel time / yggdrasil time, lower is better),
//! each the median of interleaved rounds.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use flywheel_flags::{CompiledFlagSet, EvaluationContext, FlagDocument};
use serde_json::{json, Map, Value};
use unleash_yggdrasil::{ClientFeatures, Context, EngineState, UpdateMessage};

const FLAGS: usize = 20;
const USERS: usize = 1024;

fn flag_key(index: usize) -> String {
    format!("flag-{index:02}")
}

fn flywheel_flags() -> CompiledFlagSet {
    let flags: Map<String, Value> = (0..FLAGS)
        .map(|index| {
            let flag = json!({
                "state": "ENABLED",
                "variants": {"on": true, "off": false},
                "defaultVariant": "off",
                "targeting": {"if": [
                    {"in": [{"var": "plan"}, ["pro", "team"]]},
                    {"fractional": [["on", 50], ["off", 50]]},
                    "off"
                ]}
            });
            (flag_key(index), flag)
        })
        .collect();
    CompiledFlagSet::compile(FlagDocument::from_json(&json!({"flags": flags})).unwrap()).unwrap()
}

fn unleash_engine() -> EngineState {
    let features: Vec<Value> = (0..FLAGS)
        .map(|index| {
            json!({
                "name": flag_key(index), "type": "release", "enabled": true, "project": "default",
                "strategies": [{
                    "name": "flexibleRollout",
                    "parameters": {"rollout": "50", "stickiness": "default", "groupId": flag_key(index)},
                    "constraints": [{"contextName": "plan", "operator": "IN", "values": ["pro", "team"],
                                     "caseInsensitive": false, "inverted": false}]
                }],
                "variants": []
            })
        })
        .collect();
    let features: ClientFeatures =
        serde_json::from_value(json!({"version": 2, "features": features})).unwrap();
    let engine = EngineState::default();
    if let Some(warnings) = engine.take_state(UpdateMessage::FullResponse(features)) {
        assert!(warnings.is_empty(), "{warnings:?}");
    }
    engine
}

fn flywheel_contexts() -> Vec<EvaluationContext> {
    (0..USERS)
        .map(|user| {
            json!({"targetingKey": format!("user-{user}"), "plan": "pro"})
                .as_object()
                .unwrap()
                .clone()
        })
        .collect()
}

fn unleash_contexts() -> Vec<Context> {
    (0..USERS)
        .map(|user| Context {
            user_id: Some(format!("user-{user}")),
            properties: Some(HashMap::from([("plan".to_string(), "pro".to_string())])),
            ..Context::default()
        })
        .collect()
}

/// Median nanoseconds per call of `work` over interleaved rounds.
fn per_call(rounds: &mut [Vec<f64>; 2], index: usize, calls: u32, mut work: impl FnMut(u32)) {
    let start = Instant::now();
    for call in 0..calls {
        work(call);
    }
    rounds[index].push(start.elapsed().as_nanos() as f64 / f64::from(calls));
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; test runners (`cargo test --all-targets`,
    // nextest's --list) run bench targets too: do nothing for them.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let flags = flywheel_flags();
    let engine = unleash_engine();
    let contexts = flywheel_contexts();
    let unleash = unleash_contexts();
    let now = 1_767_225_600;
    let single = flag_key(0);

    let mut criterion = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut group = criterion.benchmark_group("single flag");
    let mut user = 0;
    group.bench_function("flywheel evaluate", |b| {
        b.iter(|| {
            user = (user + 1) % USERS;
            black_box(
                flags
                    .evaluate(black_box(&single), &contexts[user], now)
                    .variant,
            )
        })
    });
    group.bench_function("yggdrasil is_enabled", |b| {
        b.iter(|| {
            user = (user + 1) % USERS;
            black_box(engine.is_enabled(black_box(&single), &unleash[user], &None))
        })
    });
    group.finish();
    let mut group = criterion.benchmark_group("bulk, 20 flags");
    group.bench_function("flywheel evaluate_all", |b| {
        b.iter(|| {
            user = (user + 1) % USERS;
            let mut on = 0;
            flags.evaluate_all(&contexts[user], now, |resolution| {
                on += usize::from(resolution.variant == Some("on"))
            });
            black_box(on)
        })
    });
    group.bench_function("yggdrasil resolve_all", |b| {
        b.iter(|| {
            user = (user + 1) % USERS;
            black_box(engine.resolve_all(&unleash[user], &None))
        })
    });
    group.finish();
    criterion.final_summary();

    // The ratios, measured interleaved so drift hits both sides alike.
    let mut single_rounds = [Vec::new(), Vec::new()];
    let mut bulk_rounds = [Vec::new(), Vec::new()];
    for _ in 0..15 {
        per_call(&mut single_rounds, 0, 200_000, |call| {
            black_box(
                flags
                    .evaluate(&single, &contexts[call as usize % USERS], now)
                    .variant,
            );
        });
        per_call(&mut single_rounds, 1, 200_000, |call| {
            black_box(engine.is_enabled(&single, &unleash[call as usize % USERS], &None));
        });
        per_call(&mut bulk_rounds, 0, 10_000, |call| {
            let mut on = 0;
            flags.evaluate_all(&contexts[call as usize % USERS], now, |resolution| {
                on += usize::from(resolution.variant == Some("on"))
            });
            black_box(on);
        });
        per_call(&mut bulk_rounds, 1, 10_000, |call| {
            black_box(engine.resolve_all(&unleash[call as usize % USERS], &None));
        });
    }
    let [ours, theirs] = &mut single_rounds;
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "single flag: flywheel {ours:.0} ns, yggdrasil {theirs:.0} ns, ratio {:.2} (goal <= 1.00)",
        ours / theirs
    );
    let [ours, theirs] = &mut bulk_rounds;
    let (ours, theirs) = (median(ours), median(theirs));
    println!("bulk 20 flags: flywheel {ours:.0} ns, yggdrasil {theirs:.0} ns, ratio {:.2} (goal <= 0.50)", ours / theirs);
}
