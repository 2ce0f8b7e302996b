//! `check` in-process: the org cache lookup plus the decision, as the
//! `/v1/check` handler does it (without HTTP and JSON). Beside it, a bare
//! `HashMap` lookup of the same key, for scale.
//!
//! Run: cargo bench -p flywheel-server --bench check

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use chrono::{Duration, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use flywheel_domain::billing::org::{OrgCommand, OrgState};
use flywheel_domain::billing::Catalog;
use flywheel_domain::project::ProjectId;
use flywheel_server::billing::OrgCache;
use serde_json::json;

fn catalog() -> Catalog {
    Catalog::compile(
        serde_json::from_value(json!({
            "features": [
                {"key": "api_calls", "kind": "metered"},
                {"key": "projects", "kind": "metered"},
                {"key": "seats", "kind": "metered"},
                {"key": "sso", "kind": "boolean"},
                {"key": "export", "kind": "config"}
            ],
            "plans": [
                {"key": "free", "default": true, "features": {
                    "api_calls": {"limit": 1000}, "projects": {"limit": 3, "reset": "never"},
                    "seats": {"limit": 5, "reset": "never"}, "export": {"value": {"rows": 100}}}},
                {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "features": {
                    "api_calls": {"limit": 100000}, "projects": {"limit": 50, "reset": "never"},
                    "seats": {"limit": 50, "reset": "never"}, "sso": {}, "export": {"value": {"rows": 10000}}}}
            ]
        }))
        .unwrap(),
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let catalog = catalog();
    let grace = Duration::days(7);
    let now = Utc::now();
    let project = ProjectId::new_v7();
    let cache = OrgCache::default();
    let mut bare = HashMap::new();
    // 10,000 orgs with usage; half on pro.
    for i in 0..10_000 {
        let mut org = OrgState::new(format!("org-{i:05}"), now - Duration::days(40));
        if i % 2 == 0 {
            org.apply(
                &catalog,
                &OrgCommand::ChangePlan {
                    plan: "pro".into(),
                    timing: None,
                },
                grace,
                now,
            )
            .unwrap();
        }
        org.apply(
            &catalog,
            &OrgCommand::Consume {
                feature: "api_calls".into(),
                amount: 400,
            },
            grace,
            now,
        )
        .unwrap();
        org.version = 1;
        bare.insert((project, org.org_id.clone()), i);
        cache.offer(project, Arc::new(org));
    }
    let mut group = c.benchmark_group("check");
    group.bench_function("metered: cache lookup + decision", |b| {
        b.iter(|| {
            cache
                .with(project, black_box("org-04242"), |org| {
                    black_box(
                        org.check(&catalog, black_box("api_calls"), 1, grace, now)
                            .allowed,
                    )
                })
                .unwrap()
        })
    });
    group.bench_function("boolean: cache lookup + decision", |b| {
        b.iter(|| {
            cache
                .with(project, black_box("org-04243"), |org| {
                    black_box(org.check(&catalog, black_box("sso"), 1, grace, now).allowed)
                })
                .unwrap()
        })
    });
    let org = cache.get(project, "org-04242").unwrap();
    group.bench_function("metered: decision only", |b| {
        b.iter(|| {
            black_box(
                org.check(&catalog, black_box("api_calls"), 1, grace, now)
                    .allowed,
            )
        })
    });
    group.bench_function("baseline: HashMap<(ProjectId, String)> lookup", |b| {
        b.iter(|| black_box(bare.get(&(project, black_box("org-04242").to_string()))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
