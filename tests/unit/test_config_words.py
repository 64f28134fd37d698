"""Config errors in this project's words (issue 29 item 9): every refusal says what to write
instead -- no validation library's text ("Input should be a valid list", a raw regular
expression), YAML parser complaints explained with a hint -- and a file's errors come in source
order. A table of bad configs, each with the exact lines ``check-config`` prints."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.loader import check_config_text

FILE = "gw.yaml"

TABLE = [
    ("listen: 127.0.0.1:3128\n",
     [f"{FILE}:1: listen: expected a list: [a, b] or one '- item' per line (got text '127.0.0.1:3128')"]),
    ("security:\n  connect_ports: 443\n",
     [f"{FILE}:2: security.connect_ports: expected a list: [a, b] or one '- item' per line (got a whole number 443)"]),
    ("security: [443]\n",
     [f"{FILE}:1: security: expected a mapping of keys ('key: value' lines, indented under this key), got a list"]),
    ("egress:\n  x:\n    direct: {}\n    providers: [{name: 'a b', url: 'https://v.test/'}]\n",
     [f"{FILE}:4: egress.x.providers[0].name: 'a b': use only letters, digits, '_', '.' and '-'"]),
    ("reload:\n  watch: maybe\n", [f"{FILE}:2: reload.watch: expected true or false, got text 'maybe'"]),
    ("workers: two\n", [f"{FILE}:1: workers: workers is a number from 1 to 64, or 'auto' (one per CPU)"]),
    ("log:\n  format: xml\n", [f"{FILE}:2: log.format: write 'json' or 'squid', not text 'xml'"]),
    ("security:\n  connect_ports: [0]\n", [f"{FILE}:2: security.connect_ports[0]: must be greater than 0, got 0"]),
    ("clients:\n  - name: ''\n    from: [10.0.0.0/8]\n", [f"{FILE}:2: clients[0].name: must not be empty"]),
    ("clients:\n  - name: k\n    kubernetes: {issuer: 'https://i.test', service_accounts: [a/b], username: 'a:b'}\n",
     [f"{FILE}:3: clients[0].kubernetes.username: 'a:b': no ':' or '+' (they separate the user name from the "
      "profile and the password)"]),
    ("clients:\n  - name: k\n    kubernetes: {issuer: 'https://i.test', service_accounts: []}\n",
     [f"{FILE}:3: clients[0].kubernetes.service_accounts: give at least 1 item (the list is empty)"]),
    # YAML: the line, and what to do
    ("workers: 1\nadmin: b: c\n",
     [f"{FILE}:2: (yaml): not valid YAML (mapping values are not allowed here): a value holding ': ' must be "
      "quoted (\"a: b\"), or a key is indented under a value"]),
    ("clients:\n  - name: a\n     from: [10.0.0.0/8]\n", None),
    ("clients:\n  - name: a\n    allow: [*.example.com]\n", None),
    ("listen:\n\t- address: 127.0.0.1:3128\n", None),
    ("listen: [\n", [f"{FILE}:2: (yaml): not valid YAML (expected the node content, but found '<stream end>'): "
                     "the file ends inside a value: a [list], {mapping} or quote is not closed"]),
]

RAW = ("Input should", "should match pattern", "^[", "List should", "valid list", "valid dictionary",
       "Value error", "validation error", "pydantic")


@pytest.mark.parametrize(("text", "expected"), TABLE, ids=[t[0].splitlines()[0][:40] for t in TABLE])
def test_errors_in_the_projects_words(text: str, expected: list[str] | None) -> None:
    errors = check_config_text(text, FILE, offline=True).errors
    assert errors, "the config should be refused"
    for line in errors:
        assert line.startswith(f"{FILE}:") and not any(raw in line for raw in RAW), line
        if "(yaml)" in line:
            assert "not valid YAML" in line and ": " in line.split("not valid YAML", 1)[1], line
    if expected is not None:
        assert errors == expected


def test_yaml_hints_say_what_to_write() -> None:
    def error(text: str) -> str:
        (line,) = check_config_text(text, FILE, offline=True).errors
        return line

    assert error("listen:\n\t- address: 127.0.0.1:3128\n").endswith("indent with spaces: YAML does not allow tabs")
    assert "quote the value (\"*.example.com\")" in error("clients:\n  - name: a\n    allow: [*.example.com]\n")
    assert error("security:\n    connect_ports: [443]\n  allow_private: []\n").startswith(
        f"{FILE}:3: (yaml): not valid YAML (expected <block end>, but found '<block mapping start>'): this line's "
        "indentation does not fit the lines above")


def test_errors_come_in_source_order() -> None:
    text = textwrap.dedent("""\
        listen:
          - address: 127.0.0.1:3128
            protocol: gopher
        workers: many
        security:
          connect_ports: [0, 443]
        log:
          format: xml
        """)
    lines = [int(e.split(":")[1]) for e in check_config_text(text, FILE, offline=True).errors]
    assert len(lines) == 4 and lines == sorted(lines), lines
