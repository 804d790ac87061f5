"""Pure reconcile code: custom resources in, desired Kubernetes objects and status patches out.

No I/O, no kopf, no Kubernetes client (an import-linter contract enforces it). Time (``now``,
an aware datetime), randomness (``random: Callable[[int], bytes]``) and DKIM key generation
(``key_factory``) are injected. Every manifest is a plain dict; Secret values are base64 in
``data``; no function puts a secret value into a status patch or an Event.

Public functions (module: function -> what it returns):

models
    parse_smtp_relay / parse_sending_domain / parse_smtp_credential / parse_retention_policy
        (body) -> SmtpRelay / SendingDomain / SmtpCredential / RetentionPolicy (``.meta``,
        ``.spec`` pydantic model, ``.status``); raises SpecError naming the field.
    owner_reference(kind, meta) -> ownerReference dict (controller, blockOwnerDeletion).
    parse_go_duration(text) -> seconds; format_duration(seconds) -> "2160h".
conditions
    set_condition(conditions, type_, status, reason, message, observed_generation, now)
        -> new list; lastTransitionTime kept unless status flips.
    get_condition / ready_summary(conditions, required) -> (ready, reason, message).
    Event(type, reason, message): what to post on the object.
relay
    relay_children(relay, *, image, service_monitor_available, config_hash) -> [(NetworkPolicy,)
        Service, headless Service, metrics Service, PodDisruptionBudget, StatefulSet(,
        ServiceMonitor)].
    unwanted_children(relay, *, service_monitor_available) -> [(apiVersion, kind, name)] the
        spec turned off (the caller deletes those the relay controls).
    relay_status(relay, *, statefulset_status, config_hash, config_secrets, domains,
        credentials, excluded, retention_policies, now, error=None) -> status patch.
    config_secret_name(relay_name, i); CONFIG_SECRET_SLOTS; LABEL_RELAY, LABEL_COMPONENT.
render
    render_relay_config(relay, *, domains=[DomainInput(domain, dkim_secret)],
        credentials=[CredentialInput(credential, app_secret, state_secret)], policies,
        namespace_labels, now,
        paths=RuntimePaths(), validate="models"|"documents") -> RenderResult(secrets, files,
        config_hash, domains, credentials, excluded=[Exclusion(kind, key, reason, message)],
        retention, config);
        raises RenderError.
    attached_domains(relay, domains, namespace_labels) -> ({name: (domain, signing)},
        exclusions): the domains a credential's senders may use.
credential
    reconcile_credential(cred, *, relay, namespace_labels, attached_domains, existing_secret,
        now, stored_state=None, random, endpoint=None) -> CredentialResult(secret,
        state_secret, state, status, events, admission, rotated, next_check).
    check_credential(...) -> Admission(allowed, reason, message); namespace_allowed(...);
    secret_conflict(cred, secret) -> Admission | None (SecretConflict);
    current_state(cred, state_secret, app_secret, now) -> CredentialState | None;
    effective_limits(cred, relay) -> EffectiveLimits; suspension(cred, relay);
    credential_entry(cred, state, now, relay) -> config item;
    relay_endpoint(relay) -> Endpoint(host, starttls_port, implicit_port).
credential_state
    state_secret_name(cred); state_from_store(secret); state_manifest(cred, relay, state);
    rotation_due / rotate / expire_previous; ANN_ROTATE.
domain
    names_to_check(domain, existing_secret) -> TXT names the caller looks up.
    reconcile_domain(domain, *, relay, namespace_labels, existing_secret, observed, now,
        key_factory) -> DomainResult(secret, state, status, events, enabled, next_check,
        signing). ``observed``: {name: [TXT values] | None (lookup failed)} or None (not
        checked).
    generate_dkim_key(algorithm, random=None) -> PEM; dkim_txt_value(pem); split_txt(value).
retention
    retention_for_relay(relay, policies) -> Retention(message_log, suppression,
        purge_interval, policies); retention_status(policy, relays, now) -> status patch.
"""
