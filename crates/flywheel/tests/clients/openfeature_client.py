"""The OpenFeature Python SDK with the OFREP provider, pointed at Flywheel
with nothing changed but the base URL and the key header.

Usage: python3 openfeature_client.py <base-url> <publishable-key>
Prints one JSON array of evaluation details (see cli.rs for what is checked).
"""

import json
import sys

from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext

base_url, key = sys.argv[1], sys.argv[2]
api.set_provider(OFREPProvider(base_url, headers_factory=lambda: {"X-API-Key": key}, timeout=5.0))
client = api.get_client()
pro = EvaluationContext(targeting_key="of-user", attributes={"plan": "pro"})
free = EvaluationContext(targeting_key="of-user", attributes={"plan": "free"})
details = [
    client.get_boolean_details("pro-feature", False, pro),
    client.get_boolean_details("pro-feature", True, free),
    client.get_string_details("banner", "fallback", pro),
    client.get_boolean_details("missing-flag", True, pro),
    client.get_boolean_details("killed", True, pro),
    client.get_string_details("pro-feature", "wrong type", pro),
]


def name(value):
    return None if value is None else getattr(value, "value", value)


print(json.dumps([
    {"flagKey": d.flag_key, "value": d.value, "variant": d.variant,
     "reason": name(d.reason), "errorCode": name(d.error_code)}
    for d in details
]))
