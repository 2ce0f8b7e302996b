//! The billing catalog of a project: features, the meters that turn events
//! into usage, and plans. Stored and exchanged as one JSON document
//! ([`CatalogDocument`]), validated whole, and compiled into a [`Catalog`]
//! indexed for the decision path.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::period::ResetInterval;
use super::FastMap;
use crate::error::DomainError;

/// What a feature grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FeatureKind {
    /// On or off.
    Boolean,
    /// A JSON value, e.g. `{"max_export_rows": 10000}`.
    Config,
    /// A limit per usage period.
    Metered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FeatureDefinition {
    pub key: String,
    /// The display name shown in upgrade prompts ("API calls").
    #[serde(default)]
    pub name: Option<String>,
    pub kind: FeatureKind,
    /// The unit, for display ("calls", "seats").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl FeatureDefinition {
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.key)
    }
}

/// How a meter aggregates the events it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Aggregation {
    /// Each matching event adds 1.
    Count,
    /// Adds the numeric `property` (rounded to a whole unit).
    Sum,
    /// The number of distinct values of `property` this period.
    UniqueCount,
    /// The largest value of `property` seen this period.
    Max,
    /// The most recent value of `property`.
    Latest,
}

impl Aggregation {
    /// Additive meters add to usage, so their units can also be taken by
    /// `consume`, given back by `release`, and drawn from grants. The others
    /// are gauges: usage is a level set by events.
    pub fn is_additive(self) -> bool {
        matches!(self, Aggregation::Count | Aggregation::Sum)
    }
}

/// A condition on an event property (dotted paths reach into objects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PropertyFilter {
    pub property: String,
    #[serde(default = "default_operator")]
    pub op: FilterOp,
    /// The operand; a list for `in`, absent for `exists`.
    #[serde(default)]
    pub value: Value,
}

fn default_operator() -> FilterOp {
    FilterOp::Eq
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FilterOp {
    Eq,
    Ne,
    In,
    Exists,
    Gt,
    Gte,
    Lt,
    Lte,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeterDefinition {
    pub key: String,
    /// The metered feature whose usage this meter feeds.
    pub feature: String,
    /// The event name it counts (`track` events' `event`).
    pub event: String,
    pub aggregation: Aggregation,
    /// The property aggregated (all but `COUNT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property: Option<String>,
    /// All must hold for an event to count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<PropertyFilter>,
}

/// A metered limit: a number of units, or unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Units(i64),
    Unlimited,
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Units(n) => serializer.serialize_i64(*n),
            Limit::Unlimited => serializer.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Number(n) => match n.as_i64() {
                Some(units) if units >= 0 => Ok(Limit::Units(units)),
                _ => Err(serde::de::Error::custom(
                    "a limit is a whole number of units ≥ 0, or \"unlimited\"",
                )),
            },
            Value::String(s) if s == "unlimited" => Ok(Limit::Unlimited),
            Value::Null => Ok(Limit::Unlimited),
            _ => Err(serde::de::Error::custom(
                "a limit is a whole number of units ≥ 0, or \"unlimited\"",
            )),
        }
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Limit {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::Integer))
                    .minimum(Some(0)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::String))
                    .enum_values(Some(["unlimited"])),
            )
            .description(Some("A number of units, or \"unlimited\"."))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Limit {}

/// What a plan (or an org override) says about one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanFeature {
    /// Boolean features: on or off. Ignored for the other kinds.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Config features: the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Metered features: the limit per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// Metered: a hard limit denies past it; a soft one allows and reports
    /// the overage.
    #[serde(default = "default_hard")]
    pub hard: bool,
    /// Metered: the share of the limit at which `warn` turns true.
    #[serde(default = "default_warn_at")]
    pub warn_at: f64,
    /// Metered: when usage starts again from zero.
    #[serde(default)]
    pub reset: ResetInterval,
}

impl Default for PlanFeature {
    /// Included, no value, unlimited, hard, warn at 80 %, monthly.
    fn default() -> Self {
        Self {
            enabled: true,
            value: None,
            limit: None,
            hard: true,
            warn_at: default_warn_at(),
            reset: ResetInterval::default(),
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_hard() -> bool {
    true
}
fn default_warn_at() -> f64 {
    0.8
}

/// A plan's list price, used to find "the cheapest plan that would allow
/// this" for upgrade prompts. Billing itself is Stripe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Price {
    /// In the currency's minor unit (cents).
    pub amount: i64,
    pub currency: String,
    /// `month` or `year`.
    #[serde(default = "default_billing_interval")]
    pub interval: BillingInterval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BillingInterval {
    Month,
    Year,
}

fn default_billing_interval() -> BillingInterval {
    BillingInterval::Month
}

impl Price {
    /// Comparable across intervals: the monthly equivalent, in minor units ×12.
    fn yearly_amount(&self) -> i64 {
        match self.interval {
            BillingInterval::Month => self.amount.saturating_mul(12),
            BillingInterval::Year => self.amount,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanDefinition {
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The plan of orgs without a subscription (the free tier). Exactly one
    /// plan of a catalog that has plans is the default.
    #[serde(default)]
    pub default: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// The Stripe price ids that map to this plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripe_price_ids: Vec<String>,
    /// Per feature key. A feature absent here is not in the plan.
    #[serde(default)]
    pub features: BTreeMap<String, PlanFeature>,
}

impl PlanDefinition {
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.key)
    }
}

/// The whole catalog, as stored and exchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogDocument {
    #[serde(default)]
    pub features: Vec<FeatureDefinition>,
    #[serde(default)]
    pub meters: Vec<MeterDefinition>,
    #[serde(default)]
    pub plans: Vec<PlanDefinition>,
}

/// A feature's position in [`Catalog::features`]; plans index by it.
pub type FeatureIndex = usize;

/// A compiled catalog: the document plus indexes for the hot path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub document: CatalogDocument,
    feature_index: FastMap<String, FeatureIndex>,
    plan_index: FastMap<String, usize>,
    /// Per plan, per feature index: its entry.
    plan_features: Vec<Vec<Option<PlanFeature>>>,
    default_plan: Option<usize>,
    meters_by_event: FastMap<String, Vec<usize>>,
    /// Per feature index: the meter feeding it, if any.
    meter_of_feature: Vec<Option<usize>>,
    price_to_plan: FastMap<String, usize>,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn invalid(path: String, message: impl Into<String>) -> DomainError {
    DomainError::invalid("invalid_catalog", format!("{path}: {}", message.into()))
}

impl Catalog {
    /// Validates a document and compiles it. Every problem is reported, each
    /// naming its JSON path.
    pub fn compile(document: CatalogDocument) -> Result<Catalog, Vec<DomainError>> {
        let mut errors = Vec::new();
        let mut feature_index = FastMap::default();
        for (i, feature) in document.features.iter().enumerate() {
            if !valid_key(&feature.key) {
                errors.push(invalid(
                    format!("/features/{i}/key"),
                    "keys are 1–64 characters of letters, digits, `_ - . :`",
                ));
            }
            if feature_index.insert(feature.key.clone(), i).is_some() {
                errors.push(invalid(
                    format!("/features/{i}/key"),
                    format!("feature `{}` is defined twice", feature.key),
                ));
            }
        }
        let kind_of = |key: &str| feature_index.get(key).map(|&i| document.features[i].kind);

        let mut meters_by_event: FastMap<String, Vec<usize>> = FastMap::default();
        let mut meter_of_feature = vec![None; document.features.len()];
        let mut meter_keys = HashSet::new();
        for (i, meter) in document.meters.iter().enumerate() {
            let at = |field: &str| format!("/meters/{i}/{field}");
            if !valid_key(&meter.key) {
                errors.push(invalid(
                    at("key"),
                    "keys are 1–64 characters of letters, digits, `_ - . :`",
                ));
            }
            if !meter_keys.insert(meter.key.clone()) {
                errors.push(invalid(
                    at("key"),
                    format!("meter `{}` is defined twice", meter.key),
                ));
            }
            if meter.event.is_empty() {
                errors.push(invalid(at("event"), "name the event this meter counts"));
            }
            match kind_of(&meter.feature) {
                None => errors.push(invalid(
                    at("feature"),
                    format!("unknown feature `{}`", meter.feature),
                )),
                Some(FeatureKind::Metered) => {
                    let index = feature_index[&meter.feature];
                    if meter_of_feature[index].is_some() {
                        errors.push(invalid(
                            at("feature"),
                            format!(
                                "feature `{}` is already fed by another meter",
                                meter.feature
                            ),
                        ));
                    }
                    meter_of_feature[index] = Some(i);
                }
                Some(_) => errors.push(invalid(
                    at("feature"),
                    format!("feature `{}` is not metered", meter.feature),
                )),
            }
            match (meter.aggregation, &meter.property) {
                (Aggregation::Count, _) | (_, Some(_)) => {}
                (other, None) => errors.push(invalid(
                    at("property"),
                    format!("{other:?} needs the property it aggregates"),
                )),
            }
            for (j, filter) in meter.filters.iter().enumerate() {
                let operand_ok = match filter.op {
                    FilterOp::Exists => true,
                    FilterOp::In => filter.value.is_array(),
                    FilterOp::Gt | FilterOp::Gte | FilterOp::Lt | FilterOp::Lte => {
                        filter.value.is_number()
                    }
                    FilterOp::Eq | FilterOp::Ne => !filter.value.is_null(),
                };
                if !operand_ok {
                    errors.push(invalid(
                        format!("/meters/{i}/filters/{j}/value"),
                        format!(
                            "the operand of `{:?}` is missing or of the wrong type",
                            filter.op
                        ),
                    ));
                }
            }
            meters_by_event
                .entry(meter.event.clone())
                .or_default()
                .push(i);
        }

        let mut plan_index = FastMap::default();
        let mut plan_features = Vec::with_capacity(document.plans.len());
        let mut default_plan = None;
        let mut price_to_plan = FastMap::default();
        for (i, plan) in document.plans.iter().enumerate() {
            let at = |field: &str| format!("/plans/{i}/{field}");
            if !valid_key(&plan.key) {
                errors.push(invalid(
                    at("key"),
                    "keys are 1–64 characters of letters, digits, `_ - . :`",
                ));
            }
            if plan_index.insert(plan.key.clone(), i).is_some() {
                errors.push(invalid(
                    at("key"),
                    format!("plan `{}` is defined twice", plan.key),
                ));
            }
            if plan.default {
                if default_plan.is_some() {
                    errors.push(invalid(at("default"), "only one plan can be the default"));
                }
                default_plan = Some(i);
            }
            if let Some(price) = &plan.price {
                if price.amount < 0 {
                    errors.push(invalid(at("price/amount"), "a price cannot be negative"));
                }
            }
            for price_id in &plan.stripe_price_ids {
                if price_to_plan.insert(price_id.clone(), i).is_some() {
                    errors.push(invalid(
                        at("stripe_price_ids"),
                        format!("Stripe price `{price_id}` maps to two plans"),
                    ));
                }
            }
            let mut entries = vec![None; document.features.len()];
            for (key, grant) in &plan.features {
                let path = format!("/plans/{i}/features/{key}");
                match feature_index.get(key) {
                    None => errors.push(invalid(path, format!("unknown feature `{key}`"))),
                    Some(&index) => {
                        if let Err(message) =
                            check_plan_feature(document.features[index].kind, grant)
                        {
                            errors.push(invalid(path, message));
                        }
                        entries[index] = Some(grant.clone());
                    }
                }
            }
            plan_features.push(entries);
        }
        if !document.plans.is_empty() && default_plan.is_none() {
            errors.push(invalid(
                "/plans".into(),
                "mark one plan `\"default\": true`: orgs without a subscription are on it",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Catalog {
            document,
            feature_index,
            plan_index,
            plan_features,
            default_plan,
            meters_by_event,
            meter_of_feature,
            price_to_plan,
        })
    }

    pub fn feature(&self, key: &str) -> Option<(FeatureIndex, &FeatureDefinition)> {
        let index = *self.feature_index.get(key)?;
        Some((index, &self.document.features[index]))
    }

    pub fn plan(&self, key: &str) -> Option<&PlanDefinition> {
        self.plan_index.get(key).map(|&i| &self.document.plans[i])
    }

    pub fn plan_position(&self, key: &str) -> Option<usize> {
        self.plan_index.get(key).copied()
    }

    pub fn default_plan(&self) -> Option<&PlanDefinition> {
        self.default_plan.map(|i| &self.document.plans[i])
    }

    /// The default plan with its position.
    pub fn default_plan_entry(&self) -> Option<(usize, &PlanDefinition)> {
        self.default_plan.map(|i| (i, &self.document.plans[i]))
    }

    /// The plan's entry for a feature (by position of plan and feature).
    pub fn plan_feature(&self, plan: usize, feature: FeatureIndex) -> Option<&PlanFeature> {
        self.plan_features.get(plan)?.get(feature)?.as_ref()
    }

    pub fn plan_by_stripe_price(&self, price_id: &str) -> Option<&PlanDefinition> {
        self.price_to_plan
            .get(price_id)
            .map(|&i| &self.document.plans[i])
    }

    /// The meters counting events with this name.
    pub fn meters_for_event<'a>(
        &'a self,
        event: &str,
    ) -> impl Iterator<Item = &'a MeterDefinition> {
        self.meters_by_event
            .get(event)
            .into_iter()
            .flatten()
            .map(|&i| &self.document.meters[i])
    }

    pub fn meter_of_feature(&self, feature: FeatureIndex) -> Option<&MeterDefinition> {
        self.meter_of_feature
            .get(feature)
            .copied()
            .flatten()
            .map(|i| &self.document.meters[i])
    }

    pub fn has_meters(&self) -> bool {
        !self.document.meters.is_empty()
    }

    /// Plans ordered cheapest first: by yearly list price, the default plan
    /// counting as free and plans without a price last; ties by key.
    pub fn plans_by_price(&self) -> Vec<&PlanDefinition> {
        let mut plans: Vec<&PlanDefinition> = self.document.plans.iter().collect();
        plans.sort_by_key(|plan| {
            let price = match (&plan.price, plan.default) {
                (Some(price), _) => Some(price.yearly_amount()),
                (None, true) => Some(0),
                (None, false) => None,
            };
            (price.is_none(), price, plan.key.clone())
        });
        plans
    }

    /// Whether `to` costs more than `from` (an upgrade applies at once; a
    /// downgrade waits for the period end). Equal prices count as a downgrade
    /// only when `to` sorts before `from` among plans by price.
    pub fn is_upgrade(&self, from: &str, to: &str) -> bool {
        let order = self.plans_by_price();
        let rank = |key: &str| order.iter().position(|plan| plan.key == key);
        match (rank(from), rank(to)) {
            (Some(a), Some(b)) => b > a,
            _ => true,
        }
    }
}

pub(crate) fn check_plan_feature(kind: FeatureKind, grant: &PlanFeature) -> Result<(), String> {
    match kind {
        FeatureKind::Boolean => {
            if grant.value.is_some() || grant.limit.is_some() {
                return Err("a boolean feature takes only `enabled`".into());
            }
        }
        FeatureKind::Config => {
            if grant.value.is_none() || grant.limit.is_some() {
                return Err("a config feature takes a `value`".into());
            }
        }
        FeatureKind::Metered => {
            if grant.limit.is_none() || grant.value.is_some() {
                return Err("a metered feature takes a `limit` (units or \"unlimited\")".into());
            }
            if !(grant.warn_at > 0.0 && grant.warn_at <= 1.0) {
                return Err("`warn_at` is a share of the limit in (0, 1]".into());
            }
        }
    }
    Ok(())
}

/// Whether an event's properties satisfy a meter's filters.
pub fn filters_match(
    filters: &[PropertyFilter],
    properties: &serde_json::Map<String, Value>,
) -> bool {
    filters.iter().all(|filter| {
        let found = lookup(properties, &filter.property);
        match filter.op {
            FilterOp::Exists => found.is_some_and(|v| !v.is_null()),
            FilterOp::Eq => found == Some(&filter.value),
            FilterOp::Ne => found != Some(&filter.value),
            FilterOp::In => filter
                .value
                .as_array()
                .is_some_and(|options| found.is_some_and(|v| options.contains(v))),
            FilterOp::Gt | FilterOp::Gte | FilterOp::Lt | FilterOp::Lte => {
                match (found.and_then(Value::as_f64), filter.value.as_f64()) {
                    (Some(a), Some(b)) => match filter.op {
                        FilterOp::Gt => a > b,
                        FilterOp::Gte => a >= b,
                        FilterOp::Lt => a < b,
                        _ => a <= b,
                    },
                    _ => false,
                }
            }
        }
    })
}

/// A property by dotted path (`plan.tier`); a key containing a dot is tried
/// whole first.
pub fn lookup<'a>(properties: &'a serde_json::Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = properties.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut current = properties.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample() -> CatalogDocument {
        serde_json::from_value(json!({
            "features": [
                {"key": "api_calls", "name": "API calls", "kind": "metered"},
                {"key": "seats", "kind": "metered"},
                {"key": "sso", "kind": "boolean"},
                {"key": "export", "kind": "config"}
            ],
            "meters": [
                {"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT"}
            ],
            "plans": [
                {"key": "free", "default": true, "features": {
                    "api_calls": {"limit": 100},
                    "seats": {"limit": 3, "reset": "never"},
                    "export": {"value": {"max_rows": 100}}
                }},
                {"key": "pro", "price": {"amount": 2900, "currency": "usd"},
                 "stripe_price_ids": ["price_pro_m"],
                 "features": {
                    "api_calls": {"limit": 10000, "hard": false},
                    "seats": {"limit": 10, "reset": "never"},
                    "sso": {},
                    "export": {"value": {"max_rows": 10000}}
                }},
                {"key": "team", "price": {"amount": 99000, "currency": "usd", "interval": "year"},
                 "features": {"api_calls": {"limit": "unlimited"}, "sso": {}}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_valid_catalog_compiles_with_its_indexes() {
        let catalog = Catalog::compile(sample()).unwrap();
        assert_eq!(catalog.default_plan().unwrap().key, "free");
        assert_eq!(
            catalog.plan_by_stripe_price("price_pro_m").unwrap().key,
            "pro"
        );
        assert_eq!(catalog.meters_for_event("api_call").count(), 1);
        let (index, feature) = catalog.feature("api_calls").unwrap();
        assert_eq!(feature.display_name(), "API calls");
        assert_eq!(catalog.meter_of_feature(index).unwrap().key, "api");
        let pro = catalog.plan_position("pro").unwrap();
        assert_eq!(
            catalog.plan_feature(pro, index).unwrap().limit,
            Some(Limit::Units(10000))
        );
        let keys: Vec<&str> = catalog
            .plans_by_price()
            .iter()
            .map(|p| p.key.as_str())
            .collect();
        // pro: 2900 × 12 = 34800 a year < team: 99000 a year.
        assert_eq!(keys, ["free", "pro", "team"]);
        assert!(catalog.is_upgrade("free", "pro") && !catalog.is_upgrade("team", "pro"));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [
                {"key": "a", "kind": "metered"},
                {"key": "a", "kind": "boolean"},
                {"key": "b", "kind": "boolean"}
            ],
            "meters": [
                {"key": "m", "feature": "b", "event": "x", "aggregation": "SUM"},
                {"key": "n", "feature": "zzz", "event": "x", "aggregation": "COUNT",
                 "filters": [{"property": "p", "op": "in", "value": 3}]}
            ],
            "plans": [
                {"key": "p1", "features": {"b": {"limit": 3}, "nope": {}}},
                {"key": "p 2", "features": {}}
            ]
        }))
        .unwrap();
        let errors = Catalog::compile(document).unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
        for expected in [
            "/features/1/key: feature `a` is defined twice",
            "/meters/0/feature: feature `b` is not metered",
            "/meters/0/property",
            "/meters/1/feature: unknown feature `zzz`",
            "/meters/1/filters/0/value",
            "/plans/0/features/b: a boolean feature takes only `enabled`",
            "/plans/0/features/nope: unknown feature `nope`",
            "/plans/1/key",
            "/plans: mark one plan",
        ] {
            assert!(
                text.iter().any(|t| t.starts_with(expected)),
                "missing {expected}: {text:#?}"
            );
        }
        assert!(errors.iter().all(|e| e.code == "invalid_catalog"));
    }

    #[test]
    fn limits_parse_as_units_or_unlimited() {
        let parse = |v: Value| serde_json::from_value::<Limit>(v);
        assert_eq!(parse(json!(5)).unwrap(), Limit::Units(5));
        assert_eq!(parse(json!("unlimited")).unwrap(), Limit::Unlimited);
        assert!(parse(json!(-1)).is_err());
        assert!(parse(json!(1.5)).is_err());
        assert!(parse(json!("lots")).is_err());
        assert_eq!(
            serde_json::to_value(Limit::Unlimited).unwrap(),
            json!("unlimited")
        );
    }

    #[test]
    fn filters_cover_each_operator_and_dotted_paths() {
        let props = json!({"plan": {"tier": "pro"}, "rows": 120, "a.b": 1, "tags": null})
            .as_object()
            .unwrap()
            .clone();
        let f = |property: &str, op: FilterOp, value: Value| PropertyFilter {
            property: property.into(),
            op,
            value,
        };
        assert!(filters_match(
            &[f("plan.tier", FilterOp::Eq, json!("pro"))],
            &props
        ));
        assert!(filters_match(&[f("a.b", FilterOp::Eq, json!(1))], &props));
        assert!(filters_match(
            &[f("rows", FilterOp::Gte, json!(120))],
            &props
        ));
        assert!(!filters_match(
            &[f("rows", FilterOp::Gt, json!(120))],
            &props
        ));
        assert!(filters_match(
            &[f("rows", FilterOp::Lt, json!(121))],
            &props
        ));
        assert!(filters_match(
            &[f("plan.tier", FilterOp::In, json!(["pro", "team"]))],
            &props
        ));
        assert!(!filters_match(
            &[f("tags", FilterOp::Exists, Value::Null)],
            &props
        ));
        assert!(filters_match(
            &[f("missing", FilterOp::Ne, json!(1))],
            &props
        ));
        assert!(!filters_match(
            &[f("missing", FilterOp::Lte, json!(1))],
            &props
        ));
        assert!(filters_match(&[], &props));
    }
}
