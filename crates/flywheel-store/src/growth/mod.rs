//! The growth graph's storage, by area: one trait per area ([`MemberStore`],
//! [`SignupStore`], [`InvitationStore`], [`InviteLinkStore`],
//! [`ShareLinkStore`], [`OutboundStore`], [`ActivationStore`],
//! [`PromptStore`]), each implemented once, for both backends, in its own
//! file: the SQL is valid on SQLite and PostgreSQL alike and runs through the
//! shared layer of `crate::sql`. [`GrowthStore`] is all of them.
//!
//! Every operation that changes the graph runs in one transaction with its
//! consequences: the seat it takes, the referral events it records, the
//! outbox messages (webhooks) and emails it queues. A crash loses all of it
//! or none of it.

pub(crate) mod activation;
pub(crate) mod common;
pub(crate) mod effects;
pub(crate) mod invitations;
pub(crate) mod invite_links;
pub(crate) mod members;
pub(crate) mod outbound;
pub(crate) mod prompts;
mod records;
pub(crate) mod share_links;
pub(crate) mod signup;

pub use activation::ActivationStore;
pub use invitations::InvitationStore;
pub use invite_links::InviteLinkStore;
pub use members::MemberStore;
pub use outbound::OutboundStore;
pub use prompts::PromptStore;
pub use records::*;
pub use share_links::ShareLinkStore;
pub use signup::SignupStore;

/// The whole growth graph's storage; `tests/growth_suite.rs` runs against
/// each backend.
pub trait GrowthStore:
    MemberStore
    + SignupStore
    + InvitationStore
    + InviteLinkStore
    + ShareLinkStore
    + OutboundStore
    + ActivationStore
    + PromptStore
{
}

impl<T> GrowthStore for T where
    T: MemberStore
        + SignupStore
        + InvitationStore
        + InviteLinkStore
        + ShareLinkStore
        + OutboundStore
        + ActivationStore
        + PromptStore
{
}
