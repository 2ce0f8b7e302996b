//! Plans, entitlements and usage metering.
//!
//! * [`catalog`]: features, meters and plans, validated and compiled.
//! * [`period`]: anchored usage periods.
//! * [`org`]: an org's subscription, overrides, grants and usage, and the
//!   rules over them (`check`, `consume`, `release`, metering, plan changes).
//! * [`notice`]: what a write announces (webhooks, conversions).

pub mod answer;
pub mod catalog;

/// The maps the decision path reads: foldhash (fast, randomly seeded per
/// map) instead of SipHash, which dominated a `check`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod notice;
pub mod org;
pub mod period;
pub mod stripe;

pub use answer::{Reply, UsageAnswer};
pub use catalog::{Catalog, CatalogDocument, FeatureKind, Limit, PlanFeature};
pub use org::{Decision, OrgCommand, OrgState, Reason};
pub use period::{period_containing, Period, ResetInterval};

#[cfg(test)]
mod tests;
