"""IP redaction keeps version numbers; precision and recall on the labelled PII sample stay high."""

from __future__ import annotations

from benchmarks.pii_precision import measure
from benchmarks.pii_sample import EMAIL_ROWS, IP_ROWS
from tasks.config import PiiConfig
from tasks.data.clean import redact_pii


def test_version_numbers_are_not_taken_for_ip_addresses():
    for text in ("novas-3.1.1.3", "Thunderbird 1.5.0.9", "release 5.1.0.2", "foo-1.2.3.4.tar.gz", "v1.2.3.4"):
        assert redact_pii(text, PiiConfig()) == (text, 0, 0)
    assert redact_pii("Server 151.101.1.69 and host 8.8.8.8", PiiConfig())[0] == "Server <IP> and host <IP>"


def test_pii_rules_on_the_labelled_sample():
    ips = measure(IP_ROWS, lambda t: redact_pii(t, PiiConfig())[2])
    emails = measure(EMAIL_ROWS, lambda t: redact_pii(t, PiiConfig())[1])
    assert ips["recall"] == 1.0 and ips["precision"] >= 0.95, ips["wrong"]
    assert emails["recall"] == 1.0 and emails["precision"] == 1.0, emails["wrong"]
