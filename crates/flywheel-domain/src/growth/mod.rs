//! The growth graph (pure rules): who signed up, through what, and into
//! which org; invitations, invite links, share links and referrals; the
//! outbound messages their effects produce.

pub mod email;
pub mod guest_token;
pub mod model;
pub mod password;
pub mod seats;
pub mod token;
pub mod webhook_signature;
