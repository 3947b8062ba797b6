"""A labelled sample for the PII rules: strings with the e-mail addresses and public IPv4 addresses they hold.

Each row is (text, emails, public IPv4 addresses). Contexts were written after the dotted quads and addresses
found in installed packages' sources and documentation (configuration files, logs, CIDR tables, HTTP headers,
changelogs) and after the version numbers that a plain dotted-quad rule mistakes for addresses (release
names, product versions, section numbers, file names). Used by ``benchmarks/pii_precision.py`` and the tests.
"""

from __future__ import annotations

IP_ROWS: list[tuple[str, int]] = [
    # public addresses: must be redacted
    ("Resolve names through 8.8.8.8 or 1.1.1.1 when the local resolver fails.", 2),
    ('{"Cidr": "13.124.199.0/24", "Description": "edge location"}', 1),
    ("<ip_address>52.2.144.13</ip_address>", 1),
    ("ipv4_address='132.65.0.123'", 1),
    ('66.249.66.1 - - [10/Oct/2024:13:55:36 +0000] "GET / HTTP/1.1" 200 2326', 1),
    ("X-Forwarded-For: 203.45.67.89, 70.41.3.18", 2),
    ("The server at 52.94.236.248 answered with a reset.", 1),
    ("ssh admin@host -p 22 then connect to 34.102.136.180:443", 1),
    ("Failed password for root from 61.177.172.61 port 45326 ssh2", 1),
    ("allow from 185.199.108.153; deny all;", 1),
    ("Server 151.101.1.69 returned 503", 1),
    ("Host 140.82.112.3 is unreachable", 1),
    ("Peers: 5.9.10.11,5.9.10.12", 2),
    ("endpoint=http://54.231.0.1/bucket", 1),
    ("ping -c 3 9.9.9.9", 1),
    ("A record: example.net. 300 IN A 93.184.216.34", 1),
    ("client 8.26.56.26#53 query", 1),
    ("Blocked 45.33.32.156 (3 attempts)", 1),
    ("route add 100.24.0.0 mask 255.255.0.0 gw 172.16.0.1", 1),
    ("IP=20.190.160.1 region=west", 1),
    # private, loopback, documentation ranges and masks: kept by design
    ("sock.bind(('127.0.0.1', port))", 0),
    ("gateway='192.168.52.254'", 0),
    ("listen on 0.0.0.0:8080", 0),
    ("<network_mask>255.255.255.252</network_mask>", 0),
    ('"ipAddress": "10.0.0.1"', 0),
    ("in the form ``192.168.1.1:4567``", 0),
    ("example 192.0.2.10 and 198.51.100.7 (documentation ranges)", 0),
    # version numbers and other dotted numbers: must be left alone
    ("Upgraded novas-3.1.1.3 to the new format.", 0),
    ("Thunderbird 1.5.0.9 was released in December.", 0),
    ("Firefox 3.6.28.1 fixes a crash on start-up.", 0),
    ("requires version 2.0.0.4 or later", 0),
    ("tagged v1.2.3.4 on the release branch", 0),
    ("Linux kernel 2.6.32.27 and newer", 0),
    ("OpenSSL 1.0.2.5 is no longer supported", 0),
    ("download foo-1.2.3.4.tar.gz from the mirror", 0),
    ("see section 4.3.2.1 of the specification", 0),
    ("Table 3.2.1.1 lists the defaults", 0),
    ("release 5.1.0.2 (beta)", 0),
    ("chapter 1.2.3.4: installation", 0),
    ("pkg_1.4.0.3_amd64.deb", 0),
    ("java 1.8.0.151 runtime", 0),
    ("Windows 6.1.7601.2 (service pack)", 0),
    ("libfoo.so.1.2.3.4 is loaded at start", 0),
    ("build 4.2.1.9-rc2 passed", 0),
    ("SQLite 3.45.1.0 bundled", 0),
    ("Release notes for 7.0.3.1:", 0),
]

EMAIL_ROWS: list[tuple[str, int]] = [
    ("Contact jane.doe@example.org for access.", 1),
    ("Maintainer: Ops Team <ops@corp.co.uk>", 1),
    ("git clone git@github.com:org/repo.git", 1),  # an address by form; redacted by design
    ("send to first.last+tag@mail.example.com", 1),
    ("npm install pkg@1.2.3", 0),
    ("pip install 'requests>=2' @ file:///tmp/x", 0),
    ("decorator @functools.cache on line 3", 0),
    ("the matrix product a @ b", 0),
    ("user@localhost", 0),
    ("Twitter handle @tokenmill", 0),
]
