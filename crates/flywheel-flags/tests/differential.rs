//! Differential test against the reference implementation: thousands of
//! generated flags × contexts are evaluated here and by
//! `@openfeature/flagd-core` (Node, `tests/flagd-core/evaluate.mjs` at the
//! repository root), and must agree on value, variant, reason and error code.
//!
//! Needs `node` and `npm ci` run in `tests/flagd-core` (`scripts/test` and
//! `.ci/run` do it). Fails, never skips, when they are missing.
//!
//! Where flagd-core is known to differ from flagd itself, the generator stays
//! inside the common ground and says why: targeting keys are ASCII
//! (flagd-core's hash, imurmurhash, disagrees with MurmurHash3 over UTF-8 for
//! other characters; Flywheel follows flagd's Go implementation and hashes
//! UTF-8), `fractional` variants are strings, and rules never compare a
//! number with a non-numeric string (json-logic-engine throws there).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use flywheel_flags::{CompiledFlagSet, FlagDocument};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

const DOCUMENTS: usize = 300;
const FLAGS_PER_DOCUMENT: usize = 4;
const CONTEXTS_PER_DOCUMENT: usize = 10;
const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

const PLANS: [&str; 4] = ["free", "pro", "team", "enterprise"];
const VERSIONS: [&str; 8] = [
    "1.0.0",
    "v1.2.3",
    "2.0.0-beta.1",
    "1.10.0",
    "0.9",
    "3",
    "2.1.5",
    "not-a-version",
];
/// flagd's schema wants full `major.minor.patch` literals in rules.
const RULE_VERSIONS: [&str; 5] = ["1.0.0", "1.10.0", "2.0.0-beta.1", "2.1.5", "0.9.0"];
const SEMVER_OPS: [&str; 8] = ["=", "!=", ">", "<", ">=", "<=", "~", "^"];

struct Generator {
    rng: StdRng,
}

impl Generator {
    fn word(&mut self) -> String {
        let len = self.rng.gen_range(1..12);
        (0..len)
            .map(|_| {
                *b"abcdefghijklmnopqrstuvwxyz0123456789-_.@"
                    .choose(&mut self.rng)
                    .unwrap() as char
            })
            .collect()
    }

    fn condition(&mut self, depth: u32, flag_key: &str) -> Value {
        let choice = if depth >= 2 {
            self.rng.gen_range(0..8)
        } else {
            self.rng.gen_range(0..11)
        };
        match choice {
            0 => json!({"==": [{"var": "plan"}, *PLANS.choose(&mut self.rng).unwrap()]}),
            1 => {
                let plans: Vec<&str> = PLANS.choose_multiple(&mut self.rng, 2).copied().collect();
                json!({"in": [{"var": "plan"}, plans]})
            }
            2 => json!({"starts_with": [{"var": "email"}, self.word()]}),
            3 => {
                json!({"ends_with": [{"var": "email"}, *["@acme.com", ".io", "m"].choose(&mut self.rng).unwrap()]})
            }
            4 => {
                json!({"sem_ver": [{"var": "app_version"}, *SEMVER_OPS.choose(&mut self.rng).unwrap(),
                                     *RULE_VERSIONS.choose(&mut self.rng).unwrap()]})
            }
            5 => json!({">=": [{"var": "seats"}, self.rng.gen_range(0..20)]}),
            6 => {
                json!({"==": [{"var": "$flagd.flagKey"}, if self.rng.gen_bool(0.5) { flag_key.to_string() } else { self.word() }]})
            }
            7 => json!({"<": [{"var": "$flagd.timestamp"}, NOW + self.rng.gen_range(-10..10)]}),
            8 => {
                json!({"and": [self.condition(depth + 1, flag_key), self.condition(depth + 1, flag_key)]})
            }
            9 => {
                json!({"or": [self.condition(depth + 1, flag_key), self.condition(depth + 1, flag_key)]})
            }
            _ => json!({"!": [self.condition(depth + 1, flag_key)]}),
        }
    }

    fn fractional(&mut self, variants: &[String]) -> Value {
        let mut buckets: Vec<Value> = Vec::new();
        let count = self.rng.gen_range(1..=variants.len());
        for variant in variants.choose_multiple(&mut self.rng, count) {
            match self.rng.gen_range(0..4) {
                0 => buckets.push(json!([variant])),
                _ => buckets.push(json!([variant, self.rng.gen_range(0..100)])),
            }
        }
        match self.rng.gen_range(0..3) {
            // Implicit bucketing key: flagKey + targetingKey.
            0 => json!({"fractional": buckets}),
            // Explicit bucketing expression (null when the attribute is missing).
            1 => {
                let mut args = vec![json!({"var": "email"})];
                args.extend(buckets);
                json!({"fractional": args})
            }
            _ => {
                let mut args = vec![
                    json!({"cat": [{"var": "$flagd.flagKey"}, "/", {"var": ["org_id", "no-org"]}]}),
                ];
                args.extend(buckets);
                json!({"fractional": args})
            }
        }
    }

    fn result(
        &mut self,
        depth: u32,
        variants: &[String],
        evaluators: &[String],
        flag_key: &str,
    ) -> Value {
        let choice = if depth >= 2 {
            self.rng.gen_range(0..4)
        } else {
            self.rng.gen_range(0..7)
        };
        match choice {
            0 | 1 => json!(variants.choose(&mut self.rng).unwrap()),
            2 => Value::Null,
            3 => {
                if self.rng.gen_bool(0.1) {
                    json!("ghost-variant")
                } else {
                    self.fractional(variants)
                }
            }
            4 | 5 => json!({"if": [
                self.condition(depth + 1, flag_key),
                self.result(depth + 1, variants, evaluators, flag_key),
                self.result(depth + 1, variants, evaluators, flag_key)
            ]}),
            _ => match evaluators.choose(&mut self.rng) {
                Some(name) => {
                    json!({"if": [{"$ref": name}, variants[0].clone(), self.result(depth + 1, variants, evaluators, flag_key)]})
                }
                None => json!(variants[0].clone()),
            },
        }
    }

    fn variants(&mut self) -> (Vec<String>, Map<String, Value>) {
        let mut map = Map::new();
        let kind = self.rng.gen_range(0..4);
        let count = self.rng.gen_range(2..5);
        let names: Vec<String> = match kind {
            0 => vec!["true".into(), "false".into()],
            _ => (0..count).map(|index| format!("v{index}")).collect(),
        };
        for (index, name) in names.iter().enumerate() {
            let value = match kind {
                0 => json!(name == "true"),
                1 => json!(format!("value-{index}")),
                2 => json!(index as f64 * 1.5),
                _ => json!({"index": index, "name": name}),
            };
            map.insert(name.clone(), value);
        }
        (names, map)
    }

    fn document(&mut self, index: usize) -> Value {
        // Evaluators reference only evaluators after them in key order, the
        // order flagd-core substitutes them in.
        let evaluator_count = self.rng.gen_range(0..3);
        let mut evaluators = Map::new();
        let mut names = Vec::new();
        for position in (0..evaluator_count).rev() {
            let name = format!("rule{position}");
            let mut rule = self.condition(1, "");
            if let Some(later) = names.last() {
                if self.rng.gen_bool(0.5) {
                    rule = json!({"or": [rule, {"$ref": later}]});
                }
            }
            evaluators.insert(name.clone(), rule);
            names.push(name);
        }
        let mut flags = Map::new();
        for flag_index in 0..FLAGS_PER_DOCUMENT {
            let key = format!("flag-{index}-{flag_index}");
            let (variant_names, variants) = self.variants();
            let mut flag = Map::new();
            flag.insert(
                "state".into(),
                json!(if self.rng.gen_bool(0.1) {
                    "DISABLED"
                } else {
                    "ENABLED"
                }),
            );
            flag.insert("variants".into(), Value::Object(variants));
            match self.rng.gen_range(0..10) {
                0 => {} // absent: the caller's code default
                1 => {
                    flag.insert("defaultVariant".into(), Value::Null);
                }
                _ => {
                    flag.insert(
                        "defaultVariant".into(),
                        json!(variant_names.choose(&mut self.rng).unwrap()),
                    );
                }
            }
            if self.rng.gen_bool(0.85) {
                // The schema wants an object at the top: a rule, not a literal.
                let rule = match self.result(0, &variant_names, &names, &key) {
                    rule @ Value::Object(_) => rule,
                    literal => json!({"if": [self.condition(1, &key), literal, null]}),
                };
                flag.insert("targeting".into(), rule);
            }
            if self.rng.gen_bool(0.2) {
                flag.insert(
                    "metadata".into(),
                    json!({"owner": "growth", "rank": flag_index}),
                );
            }
            flags.insert(key, Value::Object(flag));
        }
        let mut document = json!({"flags": flags});
        if !evaluators.is_empty() {
            document["$evaluators"] = Value::Object(evaluators);
        }
        if self.rng.gen_bool(0.3) {
            document["metadata"] = json!({"flagSetId": format!("set-{index}")});
        }
        document
    }

    fn context(&mut self) -> Value {
        let mut context = Map::new();
        match self.rng.gen_range(0..10) {
            0 => {}
            1 => {
                context.insert("targetingKey".into(), json!(""));
            }
            _ => {
                context.insert(
                    "targetingKey".into(),
                    json!(format!("user-{}", self.word())),
                );
            }
        }
        if self.rng.gen_bool(0.8) {
            context.insert("plan".into(), json!(PLANS.choose(&mut self.rng).unwrap()));
        }
        if self.rng.gen_bool(0.7) {
            context.insert(
                "email".into(),
                json!(format!(
                    "{}@{}",
                    self.word(),
                    ["acme.com", "example.io", "gm.com"]
                        .choose(&mut self.rng)
                        .unwrap()
                )),
            );
        }
        if self.rng.gen_bool(0.7) {
            context.insert(
                "app_version".into(),
                json!(VERSIONS.choose(&mut self.rng).unwrap()),
            );
        }
        match self.rng.gen_range(0..3) {
            0 => {}
            1 => {
                context.insert("seats".into(), json!(self.rng.gen_range(0..30)));
            }
            _ => {
                context.insert("seats".into(), json!(self.rng.gen_range(0.0..30.0)));
            }
        }
        if self.rng.gen_bool(0.6) {
            context.insert(
                "org_id".into(),
                json!(format!("org-{}", self.rng.gen_range(0..50))),
            );
        }
        if self.rng.gen_bool(0.2) {
            // A caller cannot spoof the flagd envelope.
            context.insert(
                "$flagd".into(),
                json!({"flagKey": "spoofed", "timestamp": 1}),
            );
        }
        Value::Object(context)
    }
}

fn oracle_dir() -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "tests",
        "flagd-core",
    ]
    .iter()
    .collect()
}

fn run_oracle(input: &Value) -> Value {
    let dir = oracle_dir();
    assert!(
        dir.join("node_modules/@openfeature/flagd-core").is_dir(),
        "the flagd-core oracle is not installed: run `npm ci` in {}",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("evaluate.mjs")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node is needed for the differential test");
    let body = serde_json::to_vec(input).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body).unwrap());
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(output.status.success(), "the oracle failed");
    serde_json::from_slice(&output.stdout).expect("the oracle prints JSON")
}

/// JavaScript has one number type: compare numbers by value, not by how
/// JSON spelled them (`3` and `3.0`).
fn numbers_as_floats(value: Value) -> Value {
    match value {
        Value::Number(number) => json!(number.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| (key, numbers_as_floats(value)))
                .collect(),
        ),
        other => other,
    }
}

#[test]
fn flywheel_and_flagd_core_agree_on_generated_flags_and_contexts() {
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(0x000f_1a6d),
    };
    let mut documents = Vec::new();
    let mut cases = Vec::new();
    for index in 0..DOCUMENTS {
        let document = generator.document(index);
        let keys: Vec<String> = document["flags"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut evaluations = Vec::new();
        for _ in 0..CONTEXTS_PER_DOCUMENT {
            let context = generator.context();
            for key in keys
                .iter()
                .chain(std::iter::once(&"missing-flag".to_string()))
            {
                evaluations.push(json!({"flag_key": key, "context": context}));
            }
        }
        documents.push(json!({"flags_doc": document, "now": NOW, "evaluations": evaluations}));
        cases.push((document, evaluations));
    }
    let oracle = run_oracle(&json!({"documents": documents}));
    let load_errors = oracle["load_errors"].as_array().unwrap();
    let results = oracle["results"].as_array().unwrap();

    let mut compared = 0;
    let mut disagreements = Vec::new();
    for (index, (document, evaluations)) in cases.iter().enumerate() {
        assert!(
            load_errors[index].is_null(),
            "flagd-core refused document {index}: {}",
            load_errors[index]
        );
        let flags = CompiledFlagSet::compile(
            FlagDocument::from_json(document)
                .unwrap_or_else(|error| panic!("document {index}: {error}\n{document:#}")),
        )
        .unwrap();
        for (evaluation, expected) in evaluations.iter().zip(results[index].as_array().unwrap()) {
            let key = evaluation["flag_key"].as_str().unwrap();
            let context = evaluation["context"].as_object().unwrap();
            let ours = flags.evaluate(key, context, NOW);
            let ours_json = numbers_as_floats(json!({
                "value": ours.value.cloned().unwrap_or(Value::Null),
                "variant": ours.variant,
                "reason": ours.reason.as_str(),
                "error_code": ours.error.as_ref().map(|error| error.code.as_str()),
            }));
            let theirs = numbers_as_floats(json!({
                "value": expected["value"],
                "variant": expected["variant"],
                "reason": expected["reason"],
                "error_code": expected["error_code"],
            }));
            compared += 1;
            if ours_json != theirs {
                disagreements.push(format!(
                    "flag {key} in document {index}\n  rule: {}\n  context: {}\n  flywheel:   {ours_json}\n  flagd-core: {theirs} ({})",
                    document["flags"][key]["targeting"], evaluation["context"], expected["error_message"]
                ));
            }
        }
    }
    assert!(compared >= 10_000, "only {compared} evaluations compared");
    assert!(
        disagreements.is_empty(),
        "{} of {compared} evaluations disagree; first ones:\n{}",
        disagreements.len(),
        disagreements
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
