//! Compiled flags and their evaluation.
//!
//! Targeting rules are compiled once, when a flag set is built (on save and on
//! snapshot reload), by `datalogic-rs`, a maintained JSONLogic engine that
//! ships flagd's `fractional` (MurmurHash3 x86_32, seed 0, integer weights,
//! `(hash * total) >> 32`) and `sem_ver`, plus `starts_with`/`ends_with`.
//!
//! Evaluation allocates nothing on the heap once warm: the caller's context
//! is mirrored into a per-thread bump arena that is reset after each call,
//! and a [`Resolution`] borrows its variant, value and metadata from the
//! compiled flag.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::{DataValue, Engine, Logic};
use serde_json::{Map, Value};

use crate::definition::{escape_pointer, FlagDefinition, FlagDocument, FlagState};
use crate::FlagError;

/// Why a flag resolved as it did (OpenFeature's standard reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No targeting: the default variant, always.
    Static,
    /// Targeting picked a variant.
    TargetingMatch,
    /// Targeting ran and picked nothing: the default variant (or, without
    /// one, the caller's code default).
    Default,
    /// The flag is disabled: no value; the caller's code default applies.
    Disabled,
    /// Evaluation failed; see the error. The caller's code default applies.
    Error,
}

impl Reason {
    /// The reason as OpenFeature and OFREP spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "STATIC",
            Self::TargetingMatch => "TARGETING_MATCH",
            Self::Default => "DEFAULT",
            Self::Disabled => "DISABLED",
            Self::Error => "ERROR",
        }
    }
}

/// OpenFeature's error codes, as OFREP spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolutionErrorCode {
    FlagNotFound,
    ParseError,
    TargetingKeyMissing,
    InvalidContext,
    TypeMismatch,
    General,
}

impl ResolutionErrorCode {
    /// The code as OpenFeature and OFREP spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FlagNotFound => "FLAG_NOT_FOUND",
            Self::ParseError => "PARSE_ERROR",
            Self::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            Self::InvalidContext => "INVALID_CONTEXT",
            Self::TypeMismatch => "TYPE_MISMATCH",
            Self::General => "GENERAL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionError {
    pub code: ResolutionErrorCode,
    pub message: Cow<'static, str>,
}

/// The outcome of evaluating one flag. `value` is `None` when the caller's
/// code default applies (disabled flag, no default variant, or an error).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'f> {
    pub key: &'f str,
    pub reason: Reason,
    pub variant: Option<&'f str>,
    pub value: Option<&'f Value>,
    pub error: Option<ResolutionError>,
    /// Flag-set metadata overlaid with the flag's own.
    pub metadata: &'f Map<String, Value>,
}

/// The evaluation context a caller sends: `targetingKey` plus any attributes.
pub type EvaluationContext = Map<String, Value>;

#[derive(Debug)]
struct CompiledFlag {
    key: String,
    state: FlagState,
    /// Variant names and values, in the document's order.
    variants: Vec<(String, Value)>,
    default_variant: Option<usize>,
    targeting: Option<Logic>,
    /// The rule buckets by `targetingKey` (an implicit `fractional`) or
    /// reads it, so a context without one cannot be evaluated as meant.
    needs_targeting_key: bool,
    metadata: Map<String, Value>,
}

/// A project's flags, compiled for evaluation. Immutable; rebuilt whole when
/// any flag changes, and shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct CompiledFlagSet {
    document: FlagDocument,
    /// A strong entity tag of the document: equal documents, equal tags, on
    /// every node.
    etag: String,
    /// Sorted by key, so bulk evaluation answers in a stable order.
    flags: Vec<CompiledFlag>,
    index: HashMap<String, usize>,
}

impl PartialEq for CompiledFlagSet {
    fn eq(&self, other: &Self) -> bool {
        self.document == other.document
    }
}

impl Eq for CompiledFlagSet {}

impl Default for CompiledFlagSet {
    fn default() -> Self {
        Self::compile(FlagDocument::default()).expect("an empty flag set compiles")
    }
}

fn compile_flag(
    key: &str,
    flag: &FlagDefinition,
    document: &FlagDocument,
) -> Result<CompiledFlag, FlagError> {
    let at = format!("/flags/{}", escape_pointer(key));
    let (targeting, needs_targeting_key) = match &flag.targeting {
        Some(rule) => {
            let at = format!("{at}/targeting");
            let expanded = expand_refs(rule, &document.evaluators, &at)?;
            let needs = uses_targeting_key(&expanded);
            (Some(compile_rule(&expanded, &at)?), needs)
        }
        None => (None, false),
    };
    let variants: Vec<(String, Value)> = flag
        .variants
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let default_variant = flag
        .default_variant
        .as_ref()
        .and_then(|name| variants.iter().position(|(variant, _)| variant == name));
    let mut metadata = document.metadata.clone();
    metadata.extend(flag.metadata.clone());
    Ok(CompiledFlag {
        key: key.to_owned(),
        state: flag.state,
        variants,
        default_variant,
        targeting,
        needs_targeting_key,
        metadata,
    })
}

/// The one engine every rule is compiled and evaluated with (a compiled rule
/// is tied to the engine that compiled it).
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(Engine::new)
}

thread_local! {
    static ARENA: RefCell<Bump> = RefCell::new(Bump::with_capacity(16 * 1024));
}

impl CompiledFlagSet {
    /// Compiles a checked document. Errors only for rules the engine refuses,
    /// which [`FlagDocument::from_json`] has already ruled out.
    pub fn compile(document: FlagDocument) -> Result<Self, FlagError> {
        let flags = document
            .flags
            .iter()
            .map(|(key, flag)| compile_flag(key, flag, &document))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::assemble(document, flags))
    }

    /// Compiles what compiles and leaves out (and returns the errors of) any
    /// flag that does not, so one bad stored flag cannot take the others
    /// down. Flags come from the store already checked: this neither
    /// re-validates them against the schema nor compiles them twice.
    pub fn compile_lenient(mut document: FlagDocument) -> (Self, Vec<FlagError>) {
        let mut flags = Vec::with_capacity(document.flags.len());
        let mut errors = Vec::new();
        let mut rejected = Vec::new();
        for (key, flag) in &document.flags {
            match compile_flag(key, flag, &document) {
                Ok(compiled) => flags.push(compiled),
                Err(error) => {
                    rejected.push(key.clone());
                    errors.push(error);
                }
            }
        }
        for key in rejected {
            document.flags.remove(&key);
        }
        (Self::assemble(document, flags), errors)
    }

    fn assemble(document: FlagDocument, flags: Vec<CompiledFlag>) -> Self {
        let index = flags
            .iter()
            .enumerate()
            .map(|(position, flag)| (flag.key.clone(), position))
            .collect();
        let etag = crate::strong_etag(document.to_json().to_string().as_bytes());
        Self {
            document,
            etag,
            flags,
            index,
        }
    }

    /// The source document (for export and the local-evaluation snapshot).
    pub fn document(&self) -> &FlagDocument {
        &self.document
    }

    /// The quoted entity tag of the whole flag set (for `ETag` headers).
    pub fn etag(&self) -> &str {
        &self.etag
    }

    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// True when the flag's targeting buckets by or reads `targetingKey`.
    pub fn needs_targeting_key(&self, key: &str) -> bool {
        self.index
            .get(key)
            .is_some_and(|&position| self.flags[position].needs_targeting_key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Evaluates one flag. `now` is Unix seconds, exposed to rules as
    /// `$flagd.timestamp`.
    pub fn evaluate<'f>(
        &'f self,
        key: &'f str,
        context: &EvaluationContext,
        now: i64,
    ) -> Resolution<'f> {
        let Some(&position) = self.index.get(key) else {
            return not_found(key);
        };
        let flag = &self.flags[position];
        if flag.state == FlagState::Disabled || flag.targeting.is_none() {
            // No context is needed: skip mirroring it.
            return resolve_without_targeting(flag);
        }
        with_arena(|arena| {
            let base = mirror_object(context, arena);
            evaluate_flag(flag, base, now, arena)
        })
    }

    /// Evaluates every flag for one context, in key order, mirroring the
    /// context once. `each` sees the resolutions as they are made.
    pub fn evaluate_all<'f>(
        &'f self,
        context: &EvaluationContext,
        now: i64,
        mut each: impl FnMut(Resolution<'f>),
    ) {
        with_arena(|arena| {
            let base = mirror_object(context, arena);
            for flag in &self.flags {
                if flag.state == FlagState::Disabled || flag.targeting.is_none() {
                    each(resolve_without_targeting(flag));
                } else {
                    each(evaluate_flag(flag, base, now, arena));
                }
            }
        });
    }
}

fn with_arena<R>(work: impl FnOnce(&Bump) -> R) -> R {
    ARENA.with(|cell| {
        let mut arena = cell.borrow_mut();
        let result = work(&arena);
        arena.reset();
        result
    })
}

fn not_found(key: &str) -> Resolution<'_> {
    static EMPTY: OnceLock<Map<String, Value>> = OnceLock::new();
    Resolution {
        key,
        reason: Reason::Error,
        variant: None,
        value: None,
        error: Some(ResolutionError {
            code: ResolutionErrorCode::FlagNotFound,
            message: Cow::Borrowed("flag not found"),
        }),
        metadata: EMPTY.get_or_init(Map::new),
    }
}

fn resolve_without_targeting(flag: &CompiledFlag) -> Resolution<'_> {
    if flag.state == FlagState::Disabled {
        return Resolution {
            key: &flag.key,
            reason: Reason::Disabled,
            variant: None,
            value: None,
            error: None,
            metadata: &flag.metadata,
        };
    }
    serve_default(flag, Reason::Static)
}

/// The default variant, or no value (caller's code default) without one.
fn serve_default(flag: &CompiledFlag, reason: Reason) -> Resolution<'_> {
    let (variant, value) = match flag.default_variant {
        Some(index) => {
            let (name, value) = &flag.variants[index];
            (Some(name.as_str()), Some(value))
        }
        None => (None, None),
    };
    Resolution {
        key: &flag.key,
        reason: if variant.is_none() {
            Reason::Default
        } else {
            reason
        },
        variant,
        value,
        error: None,
        metadata: &flag.metadata,
    }
}

fn evaluate_flag<'f: 'a, 'a>(
    flag: &'f CompiledFlag,
    base: &'a [(&'a str, DataValue<'a>)],
    now: i64,
    arena: &'a Bump,
) -> Resolution<'f> {
    let targeting = flag.targeting.as_ref().expect("checked by the caller");
    // The flagd envelope, added after the caller's attributes so a caller
    // cannot spoof it.
    let flagd: &'a [(&'a str, DataValue<'a>)] = arena.alloc_slice_copy(&[
        ("flagKey", DataValue::String(&flag.key)),
        ("timestamp", DataValue::Number(NumberValue::from_i64(now))),
    ]);
    let mut caller = base.iter().copied().filter(|(name, _)| *name != "$flagd");
    let caller_len = base.iter().filter(|(name, _)| *name != "$flagd").count();
    let root = arena.alloc_slice_fill_with(caller_len + 1, |index| {
        if index < caller_len {
            caller.next().expect("counted above")
        } else {
            ("$flagd", DataValue::Object(flagd))
        }
    });
    let root: &'a DataValue<'a> = arena.alloc(DataValue::Object(root));
    let result = match engine().evaluate(targeting, root, arena) {
        Ok(result) => result,
        Err(error) => {
            return Resolution {
                key: &flag.key,
                reason: Reason::Error,
                variant: None,
                value: None,
                error: Some(ResolutionError {
                    code: ResolutionErrorCode::General,
                    message: Cow::Owned(format!("targeting failed: {error}")),
                }),
                metadata: &flag.metadata,
            };
        }
    };
    let mut scratch = [0u8; 32];
    let Some(chosen) = variant_name(result, &mut scratch) else {
        return serve_default(flag, Reason::Default);
    };
    match flag.variants.iter().find(|(name, _)| name == chosen) {
        Some((name, value)) => Resolution {
            key: &flag.key,
            reason: Reason::TargetingMatch,
            variant: Some(name),
            value: Some(value),
            error: None,
            metadata: &flag.metadata,
        },
        None => Resolution {
            key: &flag.key,
            reason: Reason::Error,
            variant: None,
            value: None,
            error: Some(ResolutionError {
                code: ResolutionErrorCode::General,
                message: Cow::Owned(format!(
                    "targeting chose `{chosen}`, which is not a variant of this flag"
                )),
            }),
            metadata: &flag.metadata,
        },
    }
}

/// The variant name a targeting result stands for, as flagd reads it: a
/// string is itself, `true`/`false` and numbers are their text (so a rule may
/// return a boolean to pick the `true`/`false` variant); null picks nothing.
fn variant_name<'r>(result: &'r DataValue<'r>, scratch: &'r mut [u8; 32]) -> Option<&'r str> {
    use std::io::Write;
    match result {
        DataValue::Null => None,
        DataValue::String(name) => Some(name),
        DataValue::Bool(true) => Some("true"),
        DataValue::Bool(false) => Some("false"),
        DataValue::Number(number) => {
            let mut cursor = std::io::Cursor::new(&mut scratch[..]);
            write!(cursor, "{number}").ok()?;
            let written = cursor.position() as usize;
            std::str::from_utf8(&scratch[..written]).ok()
        }
        // Arrays and objects never name a variant.
        _ => Some(""),
    }
}

/// Mirrors a JSON object into the arena without copying strings.
fn mirror_object<'a>(
    object: &'a Map<String, Value>,
    arena: &'a Bump,
) -> &'a [(&'a str, DataValue<'a>)] {
    arena.alloc_slice_fill_iter(
        object
            .iter()
            .map(|(name, value)| (name.as_str(), mirror(value, arena))),
    )
}

fn mirror<'a>(value: &'a Value, arena: &'a Bump) -> DataValue<'a> {
    match value {
        Value::Null => DataValue::Null,
        Value::Bool(flag) => DataValue::Bool(*flag),
        Value::Number(number) => DataValue::Number(match number.as_i64() {
            Some(integer) => NumberValue::from_i64(integer),
            None => NumberValue::from_f64(number.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(text) => DataValue::String(text),
        Value::Array(items) => DataValue::Array(
            arena.alloc_slice_fill_iter(items.iter().map(|item| mirror(item, arena))),
        ),
        Value::Object(object) => DataValue::Object(mirror_object(object, arena)),
    }
}

fn uses_targeting_key(rule: &Value) -> bool {
    match rule {
        Value::Object(object) => object.iter().any(|(name, args)| {
            let implicit_fractional = name == "fractional"
                && args
                    .as_array()
                    .and_then(|args| args.first())
                    .is_some_and(Value::is_array);
            let reads_key = name == "var"
                && (args == "targetingKey"
                    || args.get(0).is_some_and(|path| path == "targetingKey"));
            implicit_fractional || reads_key || uses_targeting_key(args)
        }),
        Value::Array(items) => items.iter().any(uses_targeting_key),
        _ => false,
    }
}

/// Compiles one targeting rule (with `$ref`s already expanded).
pub(crate) fn compile_rule(rule: &Value, at: &str) -> Result<Logic, FlagError> {
    engine()
        .compile(&null_bucketing_key_picks_nothing(rule))
        .map_err(|error| FlagError::invalid("invalid_targeting", at.to_string(), error.to_string()))
}

/// `fractional` with a computed bucketing key that comes out `null` (say, a
/// missing attribute) picks no variant in flagd-core and the JavaScript
/// providers, while the engine would fall back to `flagKey + targetingKey`.
/// Guarding the call keeps Flywheel on the providers' side of that split.
fn null_bucketing_key_picks_nothing(rule: &Value) -> Value {
    match rule {
        Value::Object(object) => {
            let rewritten: Map<String, Value> = object
                .iter()
                .map(|(name, value)| (name.clone(), null_bucketing_key_picks_nothing(value)))
                .collect();
            if let (1, Some(Value::Array(args))) = (rewritten.len(), rewritten.get("fractional")) {
                if let Some(key @ Value::Object(_)) = args.first() {
                    let call = Value::Object(rewritten.clone());
                    return serde_json::json!({"if": [{"===": [key, null]}, null, call]});
                }
            }
            Value::Object(rewritten)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(null_bucketing_key_picks_nothing).collect())
        }
        scalar => scalar.clone(),
    }
}

/// Replaces every `{"$ref": "name"}` with the named evaluator, recursively;
/// an unknown name or a cycle is an error naming the path of the `$ref`.
pub(crate) fn expand_refs(
    rule: &Value,
    evaluators: &BTreeMap<String, Value>,
    at: &str,
) -> Result<Value, FlagError> {
    let mut visiting = Vec::new();
    expand(rule, evaluators, at, &mut visiting)
}

fn expand<'e>(
    rule: &Value,
    evaluators: &'e BTreeMap<String, Value>,
    at: &str,
    visiting: &mut Vec<&'e str>,
) -> Result<Value, FlagError> {
    match rule {
        Value::Object(object) => {
            if let (1, Some(reference)) = (object.len(), object.get("$ref")) {
                let name = reference.as_str().unwrap_or_default();
                let Some((name, target)) = evaluators.get_key_value(name) else {
                    return Err(FlagError::invalid(
                        "unknown_evaluator",
                        at.to_string(),
                        format!("`$ref` names no evaluator: {reference}"),
                    ));
                };
                if visiting.contains(&name.as_str()) {
                    return Err(FlagError::invalid(
                        "evaluator_cycle",
                        at.to_string(),
                        format!("evaluator `{name}` refers to itself"),
                    ));
                }
                visiting.push(name);
                let expanded = expand(target, evaluators, at, visiting)?;
                visiting.pop();
                return Ok(expanded);
            }
            let mut out = Map::with_capacity(object.len());
            for (key, value) in object {
                let child = format!("{at}/{}", escape_pointer(key));
                out.insert(key.clone(), expand(value, evaluators, &child, visiting)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| expand(item, evaluators, &format!("{at}/{index}"), visiting))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        scalar => Ok(scalar.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flags(document: Value) -> CompiledFlagSet {
        CompiledFlagSet::compile(FlagDocument::from_json(&document).unwrap()).unwrap()
    }

    fn context(value: Value) -> EvaluationContext {
        value.as_object().unwrap().clone()
    }

    fn rollout(percentage: u64) -> CompiledFlagSet {
        flags(json!([{"key": "rollout", "rollout_percentage": percentage}]))
    }

    #[test]
    fn reasons_follow_flagd() {
        let set = flags(json!({"flags": {
            "static": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b"},
            "off": {"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"},
            "no-default": {"state": "ENABLED", "variants": {"a": 1}},
            "targeted": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b",
                         "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "a", null]}},
            "bool-result": {"state": "ENABLED", "variants": {"true": "yes", "false": "no"}, "defaultVariant": "false",
                            "targeting": {"==": [{"var": "plan"}, "pro"]}},
            "ghost": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                      "targeting": {"if": [true, "nope", "a"]}}
        }}));
        let pro = context(json!({"targetingKey": "u1", "plan": "pro"}));
        let free = context(json!({"targetingKey": "u1", "plan": "free"}));
        let at = |key: &'static str, ctx: &EvaluationContext| {
            let resolution = set.evaluate(key, ctx, 0);
            (
                resolution.reason,
                resolution.variant.map(str::to_owned),
                resolution.value.cloned(),
            )
        };
        assert_eq!(
            at("static", &pro),
            (Reason::Static, Some("b".into()), Some(json!(2)))
        );
        assert_eq!(at("off", &pro), (Reason::Disabled, None, None));
        assert_eq!(at("no-default", &pro), (Reason::Default, None, None));
        assert_eq!(
            at("targeted", &pro),
            (Reason::TargetingMatch, Some("a".into()), Some(json!(1)))
        );
        assert_eq!(
            at("targeted", &free),
            (Reason::Default, Some("b".into()), Some(json!(2)))
        );
        assert_eq!(
            at("bool-result", &pro),
            (
                Reason::TargetingMatch,
                Some("true".into()),
                Some(json!("yes"))
            )
        );
        assert_eq!(
            at("bool-result", &free),
            (
                Reason::TargetingMatch,
                Some("false".into()),
                Some(json!("no"))
            )
        );
        let ghost = set.evaluate("ghost", &pro, 0);
        assert_eq!(ghost.reason, Reason::Error);
        assert_eq!(ghost.error.unwrap().code, ResolutionErrorCode::General);
        let missing = set.evaluate("missing", &pro, 0);
        assert_eq!(
            missing.error.unwrap().code,
            ResolutionErrorCode::FlagNotFound
        );
    }

    #[test]
    fn flagd_envelope_cannot_be_spoofed_and_carries_the_time() {
        let set = flags(
            json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b",
            "targeting": {"if": [{"and": [
                {"==": [{"var": "$flagd.flagKey"}, "f"]},
                {">=": [{"var": "$flagd.timestamp"}, 1_800_000_000]}
            ]}, "a", "b"]}}}}),
        );
        let spoofed = context(json!({"$flagd": {"flagKey": "other", "timestamp": 0}}));
        assert_eq!(
            set.evaluate("f", &spoofed, 1_800_000_000).variant,
            Some("a")
        );
        assert_eq!(
            set.evaluate("f", &spoofed, 1_799_999_999).variant,
            Some("b")
        );
    }

    /// MurmurHash3 x86_32 written out from the reference, to check the
    /// engine's bucketing independently.
    fn murmur3_x86_32(bytes: &[u8]) -> u32 {
        let (c1, c2) = (0xcc9e_2d51_u32, 0x1b87_3593_u32);
        let mut hash = 0_u32;
        let chunks = bytes.chunks_exact(4);
        let tail = chunks.remainder();
        for chunk in chunks {
            let k = u32::from_le_bytes(chunk.try_into().unwrap());
            hash ^= k.wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
            hash = hash
                .rotate_left(13)
                .wrapping_mul(5)
                .wrapping_add(0xe654_6b64);
        }
        let mut k = 0_u32;
        for (index, byte) in tail.iter().enumerate() {
            k |= u32::from(*byte) << (8 * index);
        }
        if !tail.is_empty() {
            hash ^= k.wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
        }
        hash ^= bytes.len() as u32;
        hash ^= hash >> 16;
        hash = hash.wrapping_mul(0x85eb_ca6b);
        hash ^= hash >> 13;
        hash = hash.wrapping_mul(0xc2b2_ae35);
        hash ^ (hash >> 16)
    }

    #[test]
    fn fractional_buckets_are_murmur3_of_flag_key_and_targeting_key() {
        assert_eq!(murmur3_x86_32(b"hello"), 0x248b_fa47); // SMHasher reference value
        let colors = ["red", "blue", "green", "yellow"];
        let set = flags(json!({"flags": {"headerColor": {"state": "ENABLED",
            "variants": {"red": "#F00", "blue": "#00F", "green": "#0F0", "yellow": "#FF0"}, "defaultVariant": "red",
            "targeting": {"fractional": [["red", 25], ["blue", 25], ["green", 25], ["yellow", 25]]}}}}));
        for user in [
            "rachel@faas.com",
            "monica@faas.com",
            "joey@faas.com",
            "ross@faas.com",
            "ü-nicode",
        ] {
            let hash = murmur3_x86_32(format!("headerColor{user}").as_bytes());
            let bucket = (u64::from(hash) * 100) >> 32;
            let expected = colors[(bucket / 25) as usize];
            let resolution =
                set.evaluate("headerColor", &context(json!({"targetingKey": user})), 0);
            assert_eq!(resolution.variant, Some(expected), "{user}");
            assert_eq!(resolution.reason, Reason::TargetingMatch);
        }
        // An explicit bucketing key is hashed alone; a missing one picks nothing.
        let explicit = flags(
            json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b",
            "targeting": {"fractional": [{"var": "email"}, ["a", 50], ["b", 50]]}}}}),
        );
        let hash = murmur3_x86_32(b"joey@faas.com");
        let expected = if ((u64::from(hash) * 100) >> 32) < 50 {
            "a"
        } else {
            "b"
        };
        let resolution = explicit.evaluate("f", &context(json!({"email": "joey@faas.com"})), 0);
        assert_eq!(resolution.variant, Some(expected));
        let missing = explicit.evaluate("f", &context(json!({"targetingKey": "joey"})), 0);
        assert_eq!(
            (missing.reason, missing.variant),
            (Reason::Default, Some("b"))
        );
        // Without a targeting key the implicit form picks nothing either.
        let implicit = rollout(50);
        assert_eq!(
            implicit.evaluate("rollout", &context(json!({})), 0).reason,
            Reason::Default
        );
    }

    #[test]
    fn rollouts_land_within_half_a_percent_and_never_move_users_out() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys: Vec<String> = (0..100_000)
            .map(|_| format!("user-{:016x}", rng.gen::<u64>()))
            .collect();
        let sets: Vec<(u64, CompiledFlagSet)> =
            [10, 50, 90].into_iter().map(|p| (p, rollout(p))).collect();
        let mut previously_on: Option<Vec<bool>> = None;
        for (percentage, set) in &sets {
            let on: Vec<bool> = keys
                .iter()
                .map(|key| {
                    let ctx = context(json!({"targetingKey": key}));
                    set.evaluate("rollout", &ctx, 0).variant == Some("on")
                })
                .collect();
            let share = on.iter().filter(|on| **on).count() as f64 / keys.len() as f64 * 100.0;
            assert!(
                (share - *percentage as f64).abs() <= 0.5,
                "{percentage}%: {share:.3}% on"
            );
            if let Some(before) = &previously_on {
                let moved_out = before
                    .iter()
                    .zip(&on)
                    .filter(|(was, is)| **was && !**is)
                    .count();
                assert_eq!(moved_out, 0, "raising to {percentage}% moved users out");
            }
            previously_on = Some(on);
        }
    }

    #[test]
    fn bulk_evaluation_answers_every_flag_in_key_order() {
        let set = flags(json!({"flags": {
            "b": {"state": "ENABLED", "variants": {"x": 1}, "defaultVariant": "x"},
            "a": {"state": "DISABLED", "variants": {"x": 1}, "defaultVariant": "x"}
        }}));
        let mut keys = Vec::new();
        set.evaluate_all(&context(json!({})), 0, |resolution| {
            keys.push(resolution.key.to_owned())
        });
        assert_eq!(keys, ["a", "b"]);
    }
}
