//! The per-request hot path: `DecisionSnapshot::authorize` against a snapshot
//! of 1,000 projects × 2 keys, next to its floor, a bare SHA-256 of the key.
//!
//! Run with `cargo bench -p flywheel-domain --bench authorize`. Besides
//! criterion's figures it prints a rough in-process ratio (authorize / bare
//! hash) from interleaved manual timing loops: compare ratios from one run,
//! not absolute times across runs (see BENCHMARKS.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, Criterion};
use flywheel_domain::keys::{GeneratedKey, KeyKind, Scope};
use flywheel_domain::project::{ApiKeyRecord, KeyId, Project, ProjectId};
use flywheel_domain::snapshot::{DecisionSnapshot, ProjectConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const PROJECTS: usize = 1_000;

struct Fixture {
    snapshot: DecisionSnapshot,
    /// A secret key of a project in the middle of the snapshot.
    valid: String,
    /// Well-formed (`sk_` + 32 base62) but in no project.
    unknown: String,
}

fn fixture() -> Fixture {
    // Seeded, so every run benchmarks the same keys.
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let created_at = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let mut secrets = Vec::with_capacity(PROJECTS);
    let configs: Vec<ProjectConfig> = (0..PROJECTS)
        .map(|i| {
            let project = Project {
                id: ProjectId(Uuid::from_u128(i as u128 + 1)),
                name: format!("project-{i}"),
                created_at,
            };
            let keys = [KeyKind::Publishable, KeyKind::Secret]
                .into_iter()
                .enumerate()
                .map(|(k, kind)| {
                    let key = GeneratedKey::generate(kind, &mut rng);
                    let record = ApiKeyRecord {
                        id: KeyId(Uuid::from_u128(((i as u128 + 1) << 8) | k as u128)),
                        project_id: project.id,
                        kind,
                        prefix: key.prefix(),
                        hash: key.hash(),
                        label: None,
                        created_at,
                        revoked_at: None,
                    };
                    if kind == KeyKind::Secret {
                        secrets.push(key.plaintext);
                    }
                    record
                })
                .collect();
            ProjectConfig {
                project,
                keys,
                settings: Default::default(),
                schemas: Default::default(),
                flags: Default::default(),
                flag_entries: Vec::new(),
                catalog: Default::default(),
                catalog_version: 0,
                activation: Default::default(),
                prompts: Default::default(),
            }
        })
        .collect();
    let snapshot = DecisionSnapshot::from_configs(configs);
    assert_eq!(snapshot.project_count(), PROJECTS);
    let valid = secrets[PROJECTS / 2].clone();
    let unknown = GeneratedKey::generate(KeyKind::Secret, &mut rng).plaintext;
    assert!(snapshot.authorize(Some(&valid), Scope::Public).is_ok());
    assert!(snapshot.authorize(Some(&unknown), Scope::Public).is_err());
    Fixture {
        snapshot,
        valid,
        unknown,
    }
}

fn bare_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn bench_authorize(c: &mut Criterion) {
    let f = fixture();
    let mut group = c.benchmark_group("authorize");
    // Scope::Public, as on `GET /v1/project`; a secret key passes either scope.
    group.bench_function("valid_secret_key_1000x2", |b| {
        b.iter(|| {
            f.snapshot
                .authorize(black_box(Some(f.valid.as_str())), Scope::Public)
        })
    });
    group.bench_function("unknown_well_formed_key", |b| {
        b.iter(|| {
            f.snapshot
                .authorize(black_box(Some(f.unknown.as_str())), Scope::Public)
        })
    });
    group.bench_function("baseline_sha256_of_key", |b| {
        b.iter(|| bare_hash(black_box(f.valid.as_str())))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = bench_authorize
}

/// Nanoseconds per call of `op`, timed over `iters` calls.
fn ns_per_call<T>(iters: u32, mut op: impl FnMut() -> T) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(op());
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Rough in-process ratio: the three operations timed in interleaved rounds
/// (so drift from a noisy neighbour hits all three alike), median per op.
fn rough_ratio() {
    const ROUNDS: usize = 7;
    const ITERS: u32 = 200_000;
    let f = fixture();
    let (mut hash, mut valid, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        hash.push(ns_per_call(ITERS, || {
            bare_hash(black_box(f.valid.as_str()))
        }));
        valid.push(ns_per_call(ITERS, || {
            f.snapshot
                .authorize(black_box(Some(f.valid.as_str())), Scope::Public)
        }));
        unknown.push(ns_per_call(ITERS, || {
            f.snapshot
                .authorize(black_box(Some(f.unknown.as_str())), Scope::Public)
        }));
    }
    let (hash, valid, unknown) = (median(hash), median(valid), median(unknown));
    println!();
    println!(
        "rough in-process ratio (manual timing, median of {ROUNDS} interleaved rounds × {ITERS} calls; \
         compare within this run only):"
    );
    println!("  baseline sha256 of key    {hash:8.1} ns/call   1.00×");
    println!(
        "  authorize, valid key      {valid:8.1} ns/call   {:.2}× baseline",
        valid / hash
    );
    println!(
        "  authorize, unknown key    {unknown:8.1} ns/call   {:.2}× baseline",
        unknown / hash
    );
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Only under `cargo bench` (which passes --bench): `cargo test --benches`
    // runs each benchmark once as a smoke test and should stay quick.
    if std::env::args().any(|arg| arg == "--bench") {
        rough_ratio();
    }
}
