//! Evaluation allocates nothing on the heap once warm: a counting global
//! allocator checks single and bulk evaluation, targeting, `fractional` and
//! `sem_ver` included.

use flywheel_flags::{CompiledFlagSet, FlagDocument};
use serde_json::json;

/// Heap allocations made by `work` on this thread (`allocation-counter`
/// installs a counting global allocator in this test binary only).
fn allocations_during(work: impl FnOnce()) -> u64 {
    allocation_counter::measure(work).count_total
}

#[test]
fn warm_evaluation_does_not_allocate() {
    let flags = CompiledFlagSet::compile(
        FlagDocument::from_json(&json!({"flags": {
            "rollout": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                "targeting": {"if": [{"in": [{"var": "plan"}, ["pro", "team"]]},
                                     {"fractional": [["on", 50], ["off", 50]]}, "off"]}},
            "version-gate": {"state": "ENABLED", "variants": {"new": "v2", "old": "v1"}, "defaultVariant": "old",
                "targeting": {"if": [{"sem_ver": [{"var": "app_version"}, ">=", "2.1.0"]}, "new", null]}},
            "static": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"},
            "off": {"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"}
        }}))
        .unwrap(),
    )
    .unwrap();
    let contexts: Vec<_> = (0..64)
        .map(|user| {
            json!({"targetingKey": format!("user-{user}"), "plan": "pro", "app_version": "2.3.0"})
                .as_object()
                .unwrap()
                .clone()
        })
        .collect();
    // The counter sees allocations at all (so the zeros below mean something).
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1_u8]))) > 0);
    // Warm up: the per-thread arena takes its first chunk.
    for context in &contexts {
        flags.evaluate_all(context, 0, |_| {});
    }
    let mut variants = 0;
    let single = allocations_during(|| {
        for context in &contexts {
            for key in ["rollout", "version-gate", "static", "off"] {
                variants += usize::from(flags.evaluate(key, context, 0).variant.is_some());
            }
        }
    });
    let bulk = allocations_during(|| {
        for context in &contexts {
            flags.evaluate_all(context, 0, |resolution| {
                variants += usize::from(resolution.variant.is_some())
            });
        }
    });
    assert!(variants > 0);
    assert_eq!(
        (single, bulk),
        (0, 0),
        "heap allocations in {} evaluations",
        contexts.len() * 8
    );
}
