//! The growth graph in the store, on every backend: signup in one
//! transaction (idempotent), invitations (single use, race-free, expiry,
//! seats), invite links (use limits under concurrency), share-link access
//! counts, referral attribution, and the outbox (webhook deliveries and
//! emails claimed under a lease).

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use flywheel_domain::billing::org::OrgCommand;
use flywheel_domain::billing::Catalog;
use flywheel_domain::growth::email::identity_of_email;
use flywheel_domain::growth::model::{
    AcquisitionSource, ClickModel, InvitationPolicy, InvitationStatus, InviteLink,
    ReferralEventKind, ShareAudience, ShareLink, SharePermission,
};
use flywheel_domain::project::{Project, ProjectId};
use flywheel_store::growth::{
    DeliveryAttempt, DeliveryQuery, GrowthPolicy, InvitationBatch, InvitationOutcome, JoinRequest,
    NewInvitation, ReferralEventQuery, RenderedEmail, SignupRequest, WebhookEndpoint,
};
use flywheel_store::testing::TestDatabase;
use flywheel_store::{Backend, Billing, OrgRequest, OrgResult, Store};
use serde_json::json;

flywheel_store::for_each_backend!(
    signup_creates_user_org_membership_and_outbox_in_one_transaction,
    signup_is_idempotent_and_refuses_duplicates,
    invitations_are_single_use_and_concurrent_accepts_have_one_winner,
    expired_revoked_and_mismatched_invitations_are_refused,
    seats_are_enforced_when_joining,
    invite_link_uses_never_exceed_max_under_concurrency,
    share_access_counts_unique_guests_and_signups_attribute_the_share,
    referrals_attribute_within_the_window_and_refuse_self_referral,
    deliveries_are_leased_retried_and_replayed,
    emails_are_claimed_once_and_bodies_cleared_when_sent,
    members_are_removed_and_give_their_seat_back,
    billing_writes_announce_changes_limits_and_conversions_once,
    finished_outbound_work_is_pruned_and_pending_work_kept,
    milestones_are_recorded_once_by_the_crossing_event_inside_the_window,
    org_rules_read_metered_usage_after_the_batch_meters,
);

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
}

fn catalog(seats: i64) -> Arc<Catalog> {
    Arc::new(
        Catalog::compile(
            serde_json::from_value(json!({
                "features": [{"key": "seats", "kind": "metered"}],
                "plans": [{"key": "free", "default": true, "features": {
                    "seats": {"limit": seats, "reset": "never"}}}]
            }))
            .unwrap(),
        )
        .unwrap(),
    )
}

fn policy(seats: i64) -> GrowthPolicy {
    GrowthPolicy {
        invitations: InvitationPolicy::default(),
        referral_window_days: 90,
        click_model: ClickModel::LastClick,
        seats_feature: "seats".into(),
        billing: Billing::new(catalog(seats), Duration::days(7)),
    }
}

async fn setup(backend: Backend) -> (TestDatabase, Arc<dyn Store>, ProjectId) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let project = Project {
        id: ProjectId::new_v7(),
        name: "p".into(),
        created_at: at(0),
    };
    store.create_project(&project, &[]).await.unwrap();
    (db, store, project.id)
}

fn signup(project: ProjectId, user: &str, now: DateTime<Utc>) -> SignupRequest {
    let email = format!("{user}@example.com");
    SignupRequest {
        project,
        now,
        idempotency_key: format!("signup-{user}"),
        fingerprint: format!("fp-{user}"),
        user_id: user.into(),
        email_identity: identity_of_email(&email),
        email,
        email_verified: true,
        name: Some(user.to_uppercase()),
        new_org_id: format!("org-{user}"),
        org_name: Some(format!("{user}'s team")),
        invitation_token_hash: None,
        invite_link_token_hash: None,
        share_token_hash: None,
        referral_code: None,
        referral_click_id: None,
        anonymous_id: None,
        utm: None,
        referrer: None,
        new_referral_code: format!("REF-{user}"),
        policy: policy(3),
    }
}

fn invite(
    project: ProjectId,
    org: &str,
    inviter: &str,
    emails: &[&str],
    now: DateTime<Utc>,
) -> InvitationBatch {
    InvitationBatch {
        project,
        org_id: org.into(),
        inviter_user_id: inviter.into(),
        role: "member".into(),
        expires_at: now + Duration::days(7),
        invitations: emails
            .iter()
            .map(|email| NewInvitation {
                id: format!("inv-{email}"),
                email: (*email).into(),
                token_hash: format!("hash-{email}"),
                token_prefix: "fwinv_abc".into(),
                email_message: None,
            })
            .collect(),
        policy: InvitationPolicy::default(),
        now,
    }
}

fn join(
    project: ProjectId,
    token_hash: &str,
    user: &str,
    now: DateTime<Utc>,
    seats: i64,
) -> JoinRequest {
    JoinRequest {
        project,
        token_hash: token_hash.into(),
        user_id: user.into(),
        policy: policy(seats),
        now,
    }
}

async fn signup_creates_user_org_membership_and_outbox_in_one_transaction(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let endpoint = WebhookEndpoint {
        id: "ep1".into(),
        url: "http://127.0.0.1:9/hook".into(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        event_types: vec![],
        description: None,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        created_at: at(0),
    };
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    store
        .put_org_template(
            p,
            &json!({"projects": [{"name": "Sample"}]}),
            "key:t",
            at(0),
        )
        .await
        .unwrap();
    let commit = store
        .signup(&signup(p, "alice", at(10)))
        .await
        .unwrap()
        .unwrap();
    let reply = commit.reply;
    assert!(reply.org_created);
    assert_eq!(reply.membership.role, "owner");
    assert_eq!(reply.org.template_version, Some(1));
    assert_eq!(reply.plan.as_deref(), Some("free"));
    assert_eq!(
        reply.user.attribution.acquisition_source,
        AcquisitionSource::Organic
    );
    // The org's usage is anchored at the signup and one seat is taken.
    let org = &commit.orgs[0];
    assert_eq!(org.created_at, at(10));
    assert_eq!(org.usage["seats"].plan_used, 1);
    let loaded = store.load_org(p, "org-alice").await.unwrap().unwrap();
    assert_eq!(loaded.created_at, at(10));
    let deliveries = store
        .list_deliveries(
            p,
            &DeliveryQuery {
                limit: 100,
                ..DeliveryQuery::default()
            },
        )
        .await
        .unwrap();
    let mut types: Vec<&str> = deliveries.iter().map(|d| d.event_type.as_str()).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        ["membership.created", "org.provisioned", "user.signed_up"]
    );
    let events = store
        .referral_events(
            p,
            &ReferralEventQuery {
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, ReferralEventKind::SignedUp);
    assert_eq!(events[0].signup_user_id.as_deref(), Some("alice"));
    let (profile, members) = store.org_members(p, "org-alice").await.unwrap();
    assert_eq!(profile.unwrap().owner_user_id.as_deref(), Some("alice"));
    assert_eq!(members.len(), 1);
    // What flag-context enrichment reads of her.
    let known = store.user_profile(p, "alice").await.unwrap().unwrap();
    assert_eq!(known.signed_up_at, Some(at(10)));
    assert_eq!(known.acquisition_source.as_deref(), Some("organic"));
    assert_eq!(known.org_ids, ["org-alice"]);
}

async fn signup_is_idempotent_and_refuses_duplicates(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let first = store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let again = store
        .signup(&signup(p, "alice", at(2)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.reply, again.reply,
        "the same key answers the first reply"
    );
    let mut reused = signup(p, "alice", at(3));
    reused.fingerprint = "other".into();
    assert_eq!(
        store.signup(&reused).await.unwrap().unwrap_err().code,
        "idempotency_key_reused"
    );
    let mut same_user = signup(p, "alice", at(3));
    same_user.idempotency_key = "another".into();
    assert_eq!(
        store.signup(&same_user).await.unwrap().unwrap_err().code,
        "user_exists"
    );
    let mut same_email = signup(p, "bob", at(3));
    same_email.email = "alice@example.com".into();
    assert_eq!(
        store.signup(&same_email).await.unwrap().unwrap_err().code,
        "email_taken"
    );
    // A refused signup wrote nothing.
    assert!(store.get_user(p, "bob").await.unwrap().is_none());
}

async fn invitations_are_single_use_and_concurrent_accepts_have_one_winner(backend: Backend) {
    let (db, store, p) = setup(backend).await;
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let outcomes = store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["bob@example.com", "alice@example.com"],
            at(2),
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcomes[0], InvitationOutcome::Created(_)));
    assert_eq!(outcomes[1], InvitationOutcome::AlreadyMember);
    let again = store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["bob@example.com"],
            at(3),
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(again[0], InvitationOutcome::AlreadyPending(_)));
    // Bob and his alias both exist as users; only bob@ may accept.
    let mut bob = signup(p, "bob", at(4));
    bob.email_verified = true;
    store.signup(&bob).await.unwrap().unwrap();
    let mut eve = signup(p, "eve", at(4));
    eve.email = "eve@example.com".into();
    store.signup(&eve).await.unwrap().unwrap();
    assert_eq!(
        store
            .accept_invitation(&join(p, "hash-bob@example.com", "eve", at(5), 10))
            .await
            .unwrap()
            .unwrap_err()
            .code,
        "invitation_email_mismatch"
    );
    // Two accepts on two connections: exactly one membership, and the
    // invitation is accepted once.
    let other = db.open().await;
    let request = join(p, "hash-bob@example.com", "bob", at(6), 10);
    let (a, b) = tokio::join!(
        store.accept_invitation(&request),
        other.accept_invitation(&request),
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(
        a.reply, b.reply,
        "the retry answers with the same membership"
    );
    let (_, members) = store.org_members(p, "org-alice").await.unwrap();
    assert_eq!(members.len(), 2);
    let org = store.load_org(p, "org-alice").await.unwrap().unwrap();
    assert_eq!(
        org.usage["seats"].plan_used, 2,
        "one seat per member, never two for one accept"
    );
    let listed = store
        .list_invitations(p, "org-alice", Some(InvitationStatus::Accepted), at(7))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].accepted_by_user_id.as_deref(), Some("bob"));
    // The accepted event names who joined (bob was a user already).
    let accepted = store
        .referral_events(
            p,
            &ReferralEventQuery {
                kind: Some(ReferralEventKind::Accepted),
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].signup_user_id.as_deref(), Some("bob"));
    assert_eq!(accepted[0].actor_user_id.as_deref(), Some("alice"));
    // Used: the token no longer opens anything for anyone else.
    let lookup = store
        .invitation_by_token(p, "hash-bob@example.com")
        .await
        .unwrap()
        .unwrap();
    assert!(!lookup.invitation.is_open(at(7)));
    assert_eq!(lookup.org_name.as_deref(), Some("alice's team"));
}

async fn expired_revoked_and_mismatched_invitations_are_refused(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["bob@example.com", "carol@example.com"],
            at(2),
        ))
        .await
        .unwrap()
        .unwrap();
    store
        .signup(&signup(p, "bob", at(3)))
        .await
        .unwrap()
        .unwrap();
    // Past expiry (7 days): the same not-found as an unknown token.
    let late = at(2) + Duration::days(7);
    let expired = store
        .accept_invitation(&join(p, "hash-bob@example.com", "bob", late, 10))
        .await
        .unwrap();
    assert_eq!(expired.unwrap_err().code, "invitation_not_found");
    let unknown = store
        .accept_invitation(&join(p, "hash-nobody", "bob", at(4), 10))
        .await
        .unwrap();
    assert_eq!(unknown.unwrap_err().code, "invitation_not_found");
    let revoked = store
        .revoke_invitation(p, "org-alice", "inv-carol@example.com", at(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, InvitationStatus::Revoked);
    let mut carol = signup(p, "carol", at(5));
    carol.invitation_token_hash = Some("hash-carol@example.com".into());
    assert_eq!(
        store.signup(&carol).await.unwrap().unwrap_err().code,
        "invitation_not_found"
    );
    assert_eq!(
        store
            .revoke_invitation(p, "org-alice", "inv-carol@example.com", at(6))
            .await
            .unwrap()
            .unwrap_err()
            .code,
        "invitation_not_pending"
    );
    // Declining closes it.
    store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["dan@example.com"],
            at(7),
        ))
        .await
        .unwrap()
        .unwrap();
    let declined = store
        .decline_invitation(p, "hash-dan@example.com", at(8))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(declined.status, InvitationStatus::Declined);
    assert!(store
        .decline_invitation(p, "hash-dan@example.com", at(9))
        .await
        .unwrap()
        .is_err());
}

async fn seats_are_enforced_when_joining(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let mut alice = signup(p, "alice", at(1));
    alice.policy = policy(2);
    store.signup(&alice).await.unwrap().unwrap();
    store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["bob@example.com", "carol@example.com"],
            at(2),
        ))
        .await
        .unwrap()
        .unwrap();
    let mut bob = signup(p, "bob", at(3));
    bob.invitation_token_hash = Some("hash-bob@example.com".into());
    bob.policy = policy(2);
    let joined = store.signup(&bob).await.unwrap().unwrap();
    assert!(!joined.reply.org_created);
    assert_eq!(
        joined.reply.user.attribution.acquisition_source,
        AcquisitionSource::Invite
    );
    assert_eq!(
        joined.reply.user.attribution.invited_by_user_id.as_deref(),
        Some("alice")
    );
    let mut carol = signup(p, "carol", at(4));
    carol.invitation_token_hash = Some("hash-carol@example.com".into());
    carol.policy = policy(2);
    let refused = store.signup(&carol).await.unwrap().unwrap_err();
    assert_eq!(refused.code, "seat_limit_reached");
    assert!(refused.message.contains("2 of 2"), "{}", refused.message);
    // Nothing of the refused signup remains; the invitation stays open.
    assert!(store.get_user(p, "carol").await.unwrap().is_none());
    let open = store
        .invitation_by_token(p, "hash-carol@example.com")
        .await
        .unwrap()
        .unwrap();
    assert!(open.invitation.is_open(at(5)));
}

async fn invite_link_uses_never_exceed_max_under_concurrency(backend: Backend) {
    let (db, store, p) = setup(backend).await;
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let link = InviteLink {
        id: "link1".into(),
        org_id: "org-alice".into(),
        role: "viewer".into(),
        created_by_user_id: "alice".into(),
        token_prefix: "fwjoin_abc".into(),
        created_at: at(2),
        expires_at: Some(at(1000)),
        max_uses: Some(3),
        uses: 0,
        revoked_at: None,
    };
    store
        .create_invite_link(p, &link, "link-hash")
        .await
        .unwrap();
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    for user in &users {
        store
            .signup(&signup(p, user, at(3)))
            .await
            .unwrap()
            .unwrap();
    }
    let other = db.open().await;
    let attempts = users.iter().enumerate().map(|(i, user)| {
        let store = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let request = join(p, "link-hash", user, at(4), 100);
        async move { store.join_invite_link(&request).await.unwrap() }
    });
    let results = futures_util::future::join_all(attempts).await;
    let joined = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(joined, 3, "max_uses = 3");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code, "invite_link_not_found");
    }
    let links = store.list_invite_links(p, "org-alice").await.unwrap();
    assert_eq!(links[0].uses, 3);
    // Each join's accepted event names the member who joined by the link.
    let mut members: Vec<String> = store
        .referral_events(
            p,
            &ReferralEventQuery {
                kind: Some(ReferralEventKind::Accepted),
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|event| {
            assert_eq!(event.via_id.as_deref(), Some("link1"));
            event.signup_user_id.expect("the member")
        })
        .collect();
    members.sort();
    let mut winners: Vec<String> = users
        .iter()
        .zip(&results)
        .filter(|(_, result)| result.is_ok())
        .map(|(user, _)| user.clone())
        .collect();
    winners.sort();
    assert_eq!(members, winners);
    assert_eq!(links[0].status_at(at(5)), "exhausted");
    let revoked = store
        .revoke_invite_link(p, "org-alice", "link1", at(6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status_at(at(6)), "revoked");
}

async fn share_access_counts_unique_guests_and_signups_attribute_the_share(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let link = ShareLink {
        id: "shr1".into(),
        resource_type: "doc".into(),
        resource_id: "d1".into(),
        org_id: Some("org-alice".into()),
        created_by_user_id: "alice".into(),
        permission: SharePermission::Comment,
        audience: ShareAudience::Anyone,
        allow_list: vec![],
        expires_at: None,
        password_protected: false,
        token_prefix: "fwshr_abc".into(),
        created_at: at(2),
        revoked_at: None,
        accesses: 0,
        unique_guests: 0,
        first_access_at: None,
        last_access_at: None,
    };
    store
        .create_share_link(p, &link, "share-hash", Some("$argon2id$x"), &[])
        .await
        .unwrap();
    let found = store
        .share_link_by_token(p, "share-hash")
        .await
        .unwrap()
        .unwrap();
    assert!(found.link.password_protected);
    assert_eq!(found.password_hash.as_deref(), Some("$argon2id$x"));
    for (guest, second) in [("guest:a", 3), ("guest:b", 4), ("guest:a", 5)] {
        store
            .record_share_access(p, "shr1", guest, at(second))
            .await
            .unwrap()
            .unwrap();
    }
    let counted = store.get_share_link(p, "shr1").await.unwrap().unwrap();
    assert_eq!((counted.accesses, counted.unique_guests), (3, 2));
    assert_eq!(
        (counted.first_access_at, counted.last_access_at),
        (Some(at(3)), Some(at(5)))
    );
    let mut guest = signup(p, "gina", at(6));
    guest.share_token_hash = Some("share-hash".into());
    let reply = store.signup(&guest).await.unwrap().unwrap().reply;
    assert_eq!(
        reply.user.attribution.acquisition_source,
        AcquisitionSource::Share
    );
    assert_eq!(
        reply.user.attribution.share_link_id.as_deref(),
        Some("shr1")
    );
    assert!(reply.org_created, "a guest gets an org of their own");
    let kinds: Vec<ReferralEventKind> = store
        .referral_events(
            p,
            &ReferralEventQuery {
                actor_user_id: Some("alice".into()),
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ReferralEventKind::Shared,
            ReferralEventKind::ShareViewed,
            ReferralEventKind::ShareViewed,
            ReferralEventKind::SignedUp
        ]
    );
    // A revoked link is not found by a later signup; the signup still works.
    store
        .revoke_share_link(p, "shr1", at(7))
        .await
        .unwrap()
        .unwrap();
    let mut late = signup(p, "hank", at(8));
    late.share_token_hash = Some("share-hash".into());
    let reply = store.signup(&late).await.unwrap().unwrap().reply;
    assert_eq!(
        reply.user.attribution.acquisition_source,
        AcquisitionSource::Organic
    );
    assert_eq!(
        reply.user.attribution.refused[0].reason,
        "share_link_not_found"
    );
}

async fn referrals_attribute_within_the_window_and_refuse_self_referral(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let alice = store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap()
        .reply
        .user;
    let code = alice.referral_code.clone().unwrap();
    assert_eq!(
        store.referral_code(p, "alice", "IGNORED2").await.unwrap(),
        Some(code.clone())
    );
    assert_eq!(store.referral_code(p, "nobody", "X").await.unwrap(), None);
    assert_eq!(
        store
            .record_referral_click(p, "c0", "NOPE", None, at(1))
            .await
            .unwrap(),
        None
    );
    store
        .record_referral_click(p, "c1", &code, Some("anon-1"), at(2))
        .await
        .unwrap()
        .unwrap();
    // Signup by the visitor within the window: attributed to the click.
    let mut bob = signup(p, "bob", at(2) + Duration::days(30));
    bob.anonymous_id = Some("anon-1".into());
    let bob = store.signup(&bob).await.unwrap().unwrap().reply.user;
    assert_eq!(
        bob.attribution.acquisition_source,
        AcquisitionSource::Referral
    );
    assert_eq!(bob.attribution.invited_by_user_id.as_deref(), Some("alice"));
    assert_eq!(bob.attribution.referral_click_id.as_deref(), Some("c1"));
    // Past the window: refused, organic.
    store
        .record_referral_click(p, "c2", &code, Some("anon-2"), at(3))
        .await
        .unwrap()
        .unwrap();
    let mut carol = signup(p, "carol", at(3) + Duration::days(91));
    carol.anonymous_id = Some("anon-2".into());
    let carol = store.signup(&carol).await.unwrap().unwrap().reply.user;
    assert_eq!(
        carol.attribution.acquisition_source,
        AcquisitionSource::Organic
    );
    assert_eq!(
        carol.attribution.refused[0].reason,
        "attribution_window_passed"
    );
    // Alice's other mailbox using her own code: refused.
    let mut alias = signup(p, "alice2", at(4));
    alias.email = "alice+again@example.com".into();
    alias.email_identity = identity_of_email(&alias.email);
    alias.referral_code = Some(code);
    let alias = store.signup(&alias).await.unwrap().unwrap().reply.user;
    assert_eq!(
        alias.attribution.acquisition_source,
        AcquisitionSource::Organic
    );
    assert_eq!(alias.attribution.refused[0].reason, "self_referral");
}

async fn deliveries_are_leased_retried_and_replayed(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let endpoint = WebhookEndpoint {
        id: "ep1".into(),
        url: "http://127.0.0.1:9/hook".into(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        event_types: vec!["user.signed_up".into()],
        description: Some("crm".into()),
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        created_at: at(0),
    };
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let claimed = store.claim_deliveries(at(1), at(61), 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "only the wanted type");
    assert_eq!(claimed[0].event_type, "user.signed_up");
    assert_eq!(claimed[0].payload["data"]["user"]["user_id"], "alice");
    // Leased: not claimed again until the lease ends (a crash only delays it).
    assert!(store
        .claim_deliveries(at(2), at(62), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .claim_deliveries(at(61), at(121), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let failed = DeliveryAttempt {
        id: claimed[0].id.clone(),
        project: p,
        endpoint_id: "ep1".into(),
        at: at(62),
        status_code: Some(500),
        error: Some("the endpoint answered 500".into()),
        retry: Some(Some(at(67))),
        disable_endpoint: None,
    };
    store.finish_delivery(&failed).await.unwrap();
    let endpoints = store.list_webhook_endpoints(p).await.unwrap();
    assert_eq!(endpoints[0].failing_since, Some(at(62)));
    let retried = store.claim_deliveries(at(67), at(127), 10).await.unwrap();
    assert_eq!(retried[0].attempts, 1);
    store
        .finish_delivery(&DeliveryAttempt {
            at: at(68),
            status_code: Some(204),
            error: None,
            retry: None,
            ..failed.clone()
        })
        .await
        .unwrap();
    let listed = store
        .list_deliveries(
            p,
            &DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (listed[0].status.as_str(), listed[0].attempts),
        ("succeeded", 2)
    );
    assert_eq!(
        store.list_webhook_endpoints(p).await.unwrap()[0].failing_since,
        None
    );
    let replayed = store
        .replay_delivery(p, &listed[0].id, at(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replayed.status, "pending");
    // A disabled endpoint's deliveries wait.
    store
        .set_webhook_endpoint_enabled(p, "ep1", false, Some("paused"))
        .await
        .unwrap();
    assert!(store
        .claim_deliveries(at(100), at(160), 10)
        .await
        .unwrap()
        .is_empty());
    store
        .set_webhook_endpoint_enabled(p, "ep1", true, None)
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_deliveries(at(100), at(160), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn emails_are_claimed_once_and_bodies_cleared_when_sent(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    let mut batch = invite(p, "org-alice", "alice", &["bob@example.com"], at(2));
    batch.invitations[0].email_message = Some(RenderedEmail {
        kind: "invitation".into(),
        recipient: "bob@example.com".into(),
        subject: "Join".into(),
        text_body: "https://app/accept?token=secret".into(),
        html_body: None,
    });
    store.create_invitations(&batch).await.unwrap().unwrap();
    let claimed = store.claim_emails(at(2), at(62), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(store
        .claim_emails(at(3), at(63), 10)
        .await
        .unwrap()
        .is_empty());
    store
        .finish_email(&claimed[0].id, at(4), None, None)
        .await
        .unwrap();
    let listed = store.list_emails(p, 10).await.unwrap();
    assert_eq!(listed[0].status, "sent");
    assert!(store
        .claim_emails(at(100), at(160), 10)
        .await
        .unwrap()
        .is_empty());
}

fn all_events_endpoint(p: ProjectId) -> (ProjectId, WebhookEndpoint) {
    let endpoint = WebhookEndpoint {
        id: "ep-all".into(),
        url: "http://127.0.0.1:9/hook".into(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        event_types: vec![],
        description: None,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        created_at: at(0),
    };
    (p, endpoint)
}

async fn delivered_types(store: &Arc<dyn Store>, p: ProjectId) -> Vec<(String, serde_json::Value)> {
    let mut listed = store
        .list_deliveries(
            p,
            &DeliveryQuery {
                limit: 1000,
                ..DeliveryQuery::default()
            },
        )
        .await
        .unwrap();
    listed.reverse(); // oldest first
    let claimed = store
        .claim_deliveries(
            at(0) + Duration::days(3650),
            at(0) + Duration::days(3651),
            1000,
        )
        .await
        .unwrap();
    listed
        .iter()
        .map(|d| {
            let payload = claimed
                .iter()
                .find(|c| c.id == d.id)
                .map(|c| c.payload["data"].clone())
                .unwrap_or_default();
            (d.event_type.clone(), payload)
        })
        .collect()
}

async fn members_are_removed_and_give_their_seat_back(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let (_, endpoint) = all_events_endpoint(p);
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    let mut alice = signup(p, "alice", at(1));
    alice.policy = policy(2);
    store.signup(&alice).await.unwrap().unwrap();
    store
        .create_invitations(&invite(
            p,
            "org-alice",
            "alice",
            &["bob@example.com", "carol@example.com"],
            at(2),
        ))
        .await
        .unwrap()
        .unwrap();
    let mut bob = signup(p, "bob", at(3));
    bob.invitation_token_hash = Some("hash-bob@example.com".into());
    bob.policy = policy(2);
    store.signup(&bob).await.unwrap().unwrap();
    // The second seat of two: the limit is announced in the join's transaction.
    let types: Vec<String> = delivered_types(&store, p)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "usage.limit_reached").count(),
        1,
        "{types:?}"
    );

    let owner = store
        .remove_member(p, "org-alice", "alice", &policy(2), at(4))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(owner.code, "cannot_remove_owner");
    let removed = store
        .remove_member(p, "org-alice", "bob", &policy(2), at(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed.reply.unwrap().user_id, "bob");
    assert_eq!(removed.orgs[0].usage["seats"].plan_used, 1);
    let again = store
        .remove_member(p, "org-alice", "bob", &policy(2), at(6))
        .await
        .unwrap()
        .unwrap();
    assert!(again.reply.is_none());
    // Bob keeps his account (and his own org); the freed seat admits Carol.
    assert!(store.get_user(p, "bob").await.unwrap().is_some());
    let mut carol = signup(p, "carol", at(7));
    carol.invitation_token_hash = Some("hash-carol@example.com".into());
    carol.policy = policy(2);
    store.signup(&carol).await.unwrap().unwrap();
    let (_, members) = store.org_members(p, "org-alice").await.unwrap();
    let mut ids: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["alice", "carol"]);
    let types: Vec<String> = delivered_types(&store, p)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "membership.removed").count(),
        1
    );
    // Removing Bob then adding Carol crossed the limit a second time.
    assert_eq!(
        types.iter().filter(|t| *t == "usage.limit_reached").count(),
        2
    );
}

fn paid_policy() -> GrowthPolicy {
    let mut policy = policy(10);
    policy.billing.catalog = Arc::new(
        Catalog::compile(
            serde_json::from_value(json!({
                "features": [{"key": "seats", "kind": "metered"}],
                "plans": [
                    {"key": "free", "default": true, "features": {
                        "seats": {"limit": 3, "reset": "never"}}},
                    {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "features": {
                        "seats": {"limit": 10, "reset": "never"}}}
                ]
            }))
            .unwrap(),
        )
        .unwrap(),
    );
    policy
}

async fn billing_writes_announce_changes_limits_and_conversions_once(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let (_, endpoint) = all_events_endpoint(p);
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    let mut alice = signup(p, "alice", at(1));
    alice.policy = paid_policy();
    let code = store
        .signup(&alice)
        .await
        .unwrap()
        .unwrap()
        .reply
        .user
        .referral_code
        .unwrap();
    let mut dave = signup(p, "dave", at(2));
    dave.policy = paid_policy();
    dave.referral_code = Some(code);
    store.signup(&dave).await.unwrap().unwrap();

    let plan = |plan: &str, key: &str, seconds: i64| OrgRequest {
        project: p,
        org_id: "org-dave".into(),
        command: OrgCommand::ChangePlan {
            plan: plan.into(),
            timing: Some(flywheel_domain::billing::org::Timing::Immediate),
        },
        idempotency_key: Some(key.into()),
        billing: paid_policy().billing,
        now: at(seconds),
        actor_user_id: None,
    };
    let upgrade = store
        .execute_org_requests(&[plan("pro", "up-1", 10)])
        .await
        .unwrap();
    assert!(matches!(upgrade.results[0], OrgResult::Applied(_)));
    // A retry of the same request replays and announces nothing more.
    let retry = store
        .execute_org_requests(&[plan("pro", "up-1", 11)])
        .await
        .unwrap();
    assert!(matches!(retry.results[0], OrgResult::Replayed(_)));
    // Down and up again: announced, but the org converted only once.
    store
        .execute_org_requests(&[plan("free", "down", 12)])
        .await
        .unwrap();
    store
        .execute_org_requests(&[plan("pro", "up-2", 13)])
        .await
        .unwrap();

    let changes: Vec<serde_json::Value> = delivered_types(&store, p)
        .await
        .into_iter()
        .filter(|(t, _)| t == "subscription.changed")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(changes[0]["previous_plan"], "free");
    assert_eq!(changes[0]["plan"], "pro");
    assert_eq!(changes[0]["upgrade"], true);
    assert_eq!(changes[1]["plan"], "free");
    assert_eq!(changes[1]["upgrade"], false);
    let conversions = store
        .referral_events(
            p,
            &ReferralEventQuery {
                kind: Some(ReferralEventKind::Converted),
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(conversions.len(), 1);
    assert_eq!(conversions[0].actor_user_id.as_deref(), Some("alice"));
    assert_eq!(conversions[0].signup_user_id.as_deref(), Some("dave"));
    assert_eq!(conversions[0].org_id.as_deref(), Some("org-dave"));
    assert_eq!(conversions[0].resource_id, "pro");
}

async fn finished_outbound_work_is_pruned_and_pending_work_kept(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let (_, endpoint) = all_events_endpoint(p);
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    store
        .signup(&signup(p, "bob", at(2)))
        .await
        .unwrap()
        .unwrap();
    // Alice's three messages are delivered; Bob's stay pending.
    let claimed = store.claim_deliveries(at(3), at(63), 100).await.unwrap();
    assert_eq!(claimed.len(), 6);
    for delivery in claimed
        .iter()
        .filter(|d| d.payload["data"].to_string().contains("alice"))
    {
        store
            .finish_delivery(&DeliveryAttempt {
                id: delivery.id.clone(),
                project: p,
                endpoint_id: "ep-all".into(),
                at: at(4),
                status_code: Some(204),
                error: None,
                retry: None,
                disable_endpoint: None,
            })
            .await
            .unwrap();
    }
    // Nothing is old enough yet.
    let none = store.prune_outbound(at(0)).await.unwrap();
    assert_eq!(none, Default::default());
    let pruned = store.prune_outbound(at(100)).await.unwrap();
    assert_eq!(
        (pruned.messages, pruned.deliveries, pruned.signup_keys),
        (3, 3, 2)
    );
    let left = delivered_types(&store, p).await;
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left
        .iter()
        .all(|(_, data)| data.to_string().contains("bob")));
}

fn track(name: &str, user: &str, org: &str, at_: DateTime<Utc>) -> flywheel_domain::events::Event {
    use flywheel_domain::events::{Event, EventType, Source};
    Event {
        event_id: uuid::Uuid::now_v7(),
        event_id_generated: false,
        kind: EventType::Track,
        event: name.into(),
        user_id: Some(user.into()),
        anonymous_id: None,
        org_id: Some(org.into()),
        previous_id: None,
        timestamp: at_,
        original_timestamp: Some(at_),
        sent_at: None,
        received_at: at_,
        skew_corrected: false,
        future_clamped: false,
        properties: serde_json::Map::new(),
        traits: serde_json::Map::new(),
        context: serde_json::Map::new(),
        schema_version: None,
        source: Source::Native,
        schema_violations: Vec::new(),
    }
}

async fn milestones_are_recorded_once_by_the_crossing_event_inside_the_window(backend: Backend) {
    use flywheel_domain::activation::{ActivationRules, Scope};
    let (_db, store, p) = setup(backend).await;
    let (_, endpoint) = all_events_endpoint(p);
    store.create_webhook_endpoint(p, &endpoint).await.unwrap();
    let document = json!({"rules": [
        {"key": "three_projects", "scope": "user", "conditions": ["project_created >= 3"],
         "within_days": 14, "activation": true},
        {"key": "busy_org", "scope": "org", "conditions": ["project_created >= 4"]}
    ]});
    let rules: ActivationRules = serde_json::from_value(document.clone()).unwrap();
    let rules = Arc::new(rules.validate().unwrap());
    assert_eq!(
        store
            .put_activation_rules(p, &document, "key:t", at(0))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.activation_rules(p).await.unwrap().unwrap().0, 1);
    let config = store.load_project_config(p).await.unwrap().unwrap();
    assert_eq!(
        config.activation, rules,
        "the rules are part of the project's configuration"
    );

    store
        .signup(&signup(p, "alice", at(1)))
        .await
        .unwrap()
        .unwrap();
    store
        .signup(&signup(p, "bob", at(1)))
        .await
        .unwrap()
        .unwrap();
    let batch = |events: Vec<flywheel_domain::events::Event>| flywheel_store::EventBatch {
        project: p,
        events: events
            .into_iter()
            .map(|e| flywheel_store::EncodedEvent::encode(e).unwrap())
            .collect(),
        billing: None,
        activation: Some(rules.clone()),
    };
    let day = |d: i64| at(1) + Duration::days(d);
    let first = vec![
        track("project_created", "alice", "org-alice", day(1)),
        track("project_created", "alice", "org-alice", day(2)),
    ];
    store.commit_events(&[batch(first)]).await.unwrap();
    assert!(store
        .milestones(p, Scope::User, "alice")
        .await
        .unwrap()
        .is_empty());
    let third = track("project_created", "alice", "org-alice", day(3));
    let crossing = vec![
        third.clone(),
        track(
            "project_created",
            "alice",
            "org-alice",
            day(3) + Duration::hours(1),
        ),
    ];
    let commit = store
        .commit_events(&[batch(crossing.clone())])
        .await
        .unwrap();
    assert!(commit.outbox, "a milestone writes its webhook");
    // A retry of the same events: duplicates, nothing fires again.
    store.commit_events(&[batch(crossing)]).await.unwrap();

    let milestones = store.milestones(p, Scope::User, "alice").await.unwrap();
    assert_eq!(milestones.len(), 1, "{milestones:?}");
    let m = &milestones[0];
    assert_eq!(
        (m.rule.as_str(), m.count, m.event_id),
        ("three_projects", 3, third.event_id)
    );
    assert_eq!(m.seconds_to_value, 3 * 86_400);
    assert!(m.activation);
    // The org rule (4 projects) was crossed by the fourth event.
    let org = store.milestones(p, Scope::Org, "org-alice").await.unwrap();
    assert_eq!((org.len(), org[0].count), (1, 4));

    // The derived events follow in the same stream, once.
    let stored = store
        .list_events(
            p,
            &flywheel_store::EventQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let names: Vec<&str> = stored
        .iter()
        .rev()
        .map(|e| e.event.event.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "project_created",
            "project_created",
            "project_created",
            "project_created",
            "activation_threshold_crossed",
            "$activated",
            "activation_threshold_crossed"
        ]
    );
    let crossed = &stored.iter().rev().nth(4).unwrap().event;
    assert_eq!(crossed.properties["rule"], "three_projects");
    assert_eq!(crossed.properties["count"], 3);
    assert_eq!(crossed.user_id.as_deref(), Some("alice"));
    let seqs: Vec<i64> = stored.iter().rev().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<i64>>(), "numbered without gaps");

    let activated = store
        .referral_events(
            p,
            &ReferralEventQuery {
                kind: Some(ReferralEventKind::Activated),
                limit: 10,
                ..ReferralEventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(activated.len(), 1);
    assert_eq!(activated[0].signup_user_id.as_deref(), Some("alice"));
    let types: Vec<String> = delivered_types(&store, p)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "milestone.reached").count(),
        2
    );

    // Deleting Alice (privacy) takes her counts and milestones with her;
    // the org's stay (they are the org's).
    store
        .delete_person(p, &["alice".to_owned()], at(10_000_000))
        .await
        .unwrap();
    assert!(store
        .milestones(p, Scope::User, "alice")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .milestones(p, Scope::Org, "org-alice")
            .await
            .unwrap()
            .len(),
        1
    );

    // Bob's third project comes on day 15: outside the 14-day window.
    let late: Vec<_> = (13..16)
        .map(|d| track("project_created", "bob", "org-bob", day(d)))
        .collect();
    store.commit_events(&[batch(late)]).await.unwrap();
    assert!(store
        .milestones(p, Scope::User, "bob")
        .await
        .unwrap()
        .is_empty());
}

async fn org_rules_read_metered_usage_after_the_batch_meters(backend: Backend) {
    use flywheel_domain::activation::{ActivationRules, Scope};
    let (_db, store, p) = setup(backend).await;
    let rules: ActivationRules = serde_json::from_value(json!({"rules": [
        {"key": "api_usage", "scope": "org", "conditions": ["feature:api_calls >= 3"]}
    ]}))
    .unwrap();
    let rules = Arc::new(rules.validate().unwrap());
    assert!(rules.has_feature_conditions());
    let catalog = Arc::new(
        Catalog::compile(
            serde_json::from_value(json!({
                "features": [{"key": "api_calls", "kind": "metered"}],
                "meters": [{"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT"}],
                "plans": [{"key": "free", "default": true, "features": {"api_calls": {"limit": 100}}}]
            }))
            .unwrap(),
        )
        .unwrap(),
    );
    let batch = |events: Vec<flywheel_domain::events::Event>| flywheel_store::EventBatch {
        project: p,
        events: events
            .into_iter()
            .map(|e| flywheel_store::EncodedEvent::encode(e).unwrap())
            .collect(),
        billing: Some(Billing::new(catalog.clone(), Duration::days(7))),
        activation: Some(rules.clone()),
    };
    let calls = |n: i64, from: i64| {
        (0..n)
            .map(|i| track("api_call", "u1", "acme", at(from + i)))
            .collect::<Vec<_>>()
    };
    store.commit_events(&[batch(calls(2, 10))]).await.unwrap();
    assert!(store
        .milestones(p, Scope::Org, "acme")
        .await
        .unwrap()
        .is_empty());
    store.commit_events(&[batch(calls(2, 20))]).await.unwrap();
    let reached = store.milestones(p, Scope::Org, "acme").await.unwrap();
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0].rule, "api_usage");
    // Usage reads after the batch's meters: the batch that took it to 4 crossed.
    assert_eq!(reached[0].reached_at, at(20));
    // An org Flywheel did not provision is measured from its billing row's
    // creation: the first metered batch's commit time (its last event, at(11)).
    assert_eq!(reached[0].seconds_to_value, 9);
    store.commit_events(&[batch(calls(2, 30))]).await.unwrap();
    assert_eq!(
        store.milestones(p, Scope::Org, "acme").await.unwrap().len(),
        1
    );
}
