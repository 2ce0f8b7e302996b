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
use serde::Serialize;
use serde_json::{Map, Value};

use crate::definition::{escape_pointer, FlagDocument, FlagState};
use crate::FlagError;

/// Why a flag resolved as it did (OpenFeature's standard reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
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

/// OpenFeature's error codes, as OFREP spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResolutionErrorCode {
    FlagNotFound,
    ParseError,
    TargetingKeyMissing,
    InvalidContext,
    TypeMismatch,
    General,
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
    metadata: Map<String, Value>,
}

/// A project's flags, compiled for evaluation. Immutable; rebuilt whole when
/// any flag changes, and shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct CompiledFlagSet {
    document: FlagDocument,
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
        let mut flags = Vec::with_capacity(document.flags.len());
        for (key, flag) in &document.flags {
            let at = format!("/flags/{}", escape_pointer(key));
            let targeting = match &flag.targeting {
                Some(rule) => {
                    let at = format!("{at}/targeting");
                    let expanded = expand_refs(rule, &document.evaluators, &at)?;
                    Some(compile_rule(&expanded, &at)?)
                }
                None => None,
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
            flags.push(CompiledFlag {
                key: key.clone(),
                state: flag.state,
                variants,
                default_variant,
                targeting,
                metadata,
            });
        }
        let index = flags
            .iter()
            .enumerate()
            .map(|(position, flag)| (flag.key.clone(), position))
            .collect();
        Ok(Self {
            document,
            flags,
            index,
        })
    }

    /// The source document (for export and the local-evaluation snapshot).
    pub fn document(&self) -> &FlagDocument {
        &self.document
    }

    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
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

/// Compiles one targeting rule (with `$ref`s already expanded).
pub(crate) fn compile_rule(rule: &Value, at: &str) -> Result<Logic, FlagError> {
    engine()
        .compile(rule)
        .map_err(|error| FlagError::invalid("invalid_targeting", at.to_string(), error.to_string()))
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
