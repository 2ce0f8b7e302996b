//! Stripe webhooks: signature verification and the subscription facts an
//! event carries.
