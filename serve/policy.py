"""Guardrails outside the model: input and output checks from one policy file.

A frozen model cannot be patched while it serves, so the rules live here and
the server applies them around every request:

* input checks (before any token is generated): total length in characters
  and in prompt tokens, blocked regular expressions, allowed chat roles;
* output checks (while tokens stream out): blocked phrases are cut off or
  redacted before a client sees them, a character cap ends the answer, and an
  optional JSON schema validates the finished answer (with retries).

Every violation has a short name (its ``check``) that the server counts in
``/metrics`` and shows in the response (``finish_reason`` "content_filter" or
"length", or an OpenAI-style error whose ``code`` names the check).

Policy file (YAML or JSON)::

    input:
      max_chars: 8000
      max_prompt_tokens: 1024
      blocked_patterns: ["(?i)ignore (all )?previous instructions"]
      allowed_roles: [system, user, assistant]
    output:
      blocked_phrases: ["rm -rf /"]
      blocked_action: stop        # stop | redact
      max_chars: 4000
      json_schema: {type: object, required: [answer]}   # or json_schema_file: schema.json
      json_retries: 2
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCKED_ACTIONS = ("stop", "redact")
DEFAULT_ROLES = ("system", "user", "assistant")


class PolicyViolation(Exception):
    """A request or answer broke a rule; ``check`` names the rule (used as metric label and error code)."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check
        self.message = message


@dataclass
class InputPolicy:
    max_chars: int | None = None  # longest input (all prompt text / message contents together), in characters
    max_prompt_tokens: int | None = None  # longest prompt in tokens, after the chat template
    blocked_patterns: list[str] = field(default_factory=list)  # regexes; a match anywhere rejects the request
    allowed_roles: list[str] = field(default_factory=lambda: list(DEFAULT_ROLES))  # chat roles a request may use

    def __post_init__(self) -> None:
        _check_positive("input.max_chars", self.max_chars)
        _check_positive("input.max_prompt_tokens", self.max_prompt_tokens)
        _check_str_list("input.blocked_patterns", self.blocked_patterns)
        _check_str_list("input.allowed_roles", self.allowed_roles)
        if not self.allowed_roles:
            raise ValueError("policy input.allowed_roles must name at least one role")
        self._compiled = []
        for pattern in self.blocked_patterns:
            try:
                self._compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ValueError(f"policy input.blocked_patterns: {pattern!r} is not a valid regex: {exc}") from None


@dataclass
class OutputPolicy:
    blocked_phrases: list[str] = field(default_factory=list)  # text never shown to a client
    blocked_action: str = "stop"  # "stop": end the answer before the phrase; "redact": replace it and go on
    redaction: str = "[redacted]"  # what a redacted phrase becomes
    case_sensitive: bool = False  # match blocked phrases case-sensitively
    max_chars: int | None = None  # longest answer in characters; longer ones end with finish_reason "length"
    json_schema: dict[str, Any] | None = None  # the answer must be JSON valid against this schema
    json_retries: int = 2  # extra attempts (fresh samples) when the answer fails the schema

    def __post_init__(self) -> None:
        _check_str_list("output.blocked_phrases", self.blocked_phrases)
        if any(not phrase for phrase in self.blocked_phrases):
            raise ValueError("policy output.blocked_phrases must not contain an empty phrase")
        if self.blocked_action not in BLOCKED_ACTIONS:
            raise ValueError(f"policy output.blocked_action must be one of {BLOCKED_ACTIONS}, "
                             f"got {self.blocked_action!r}")
        if not isinstance(self.redaction, str):
            raise TypeError("policy output.redaction must be a string")
        _check_positive("output.max_chars", self.max_chars)
        if not isinstance(self.json_retries, int) or isinstance(self.json_retries, bool) or self.json_retries < 0:
            raise ValueError(f"policy output.json_retries must be an integer >= 0, got {self.json_retries!r}")
        if self.json_schema is not None:
            import jsonschema

            if not isinstance(self.json_schema, dict):
                raise TypeError("policy output.json_schema must be a JSON object (a schema)")
            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"policy output.json_schema is not a valid JSON schema: {exc.message}") from None
        flags = 0 if self.case_sensitive else re.IGNORECASE
        # Longest first, so a phrase that contains another is matched whole.
        phrases = sorted(self.blocked_phrases, key=len, reverse=True)
        self._blocked = re.compile("|".join(map(re.escape, phrases)), flags) if phrases else None
        self._prefixes = phrases if self.case_sensitive else [p.lower() for p in phrases]


@dataclass
class Policy:
    input: InputPolicy = field(default_factory=InputPolicy)  # checks before generation
    output: OutputPolicy = field(default_factory=OutputPolicy)  # checks on the generated text
    source: str | None = None  # the file the policy came from (for messages)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None, source: str | None = None) -> Policy:
        if not isinstance(data, dict):
            raise TypeError("policy must be a mapping with 'input' and/or 'output' sections")
        unknown = sorted(set(data) - {"input", "output"})
        if unknown:
            raise ValueError(f"policy: unknown section(s) {unknown}; expected 'input' and/or 'output'")
        input_cfg = _section(data, "input", InputPolicy)
        output_data = dict(data.get("output") or {})
        if "json_schema_file" in output_data:
            schema_path = Path(output_data.pop("json_schema_file"))
            if not schema_path.is_absolute() and base_dir is not None:
                schema_path = base_dir / schema_path
            try:
                output_data["json_schema"] = json.loads(schema_path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"policy output.json_schema_file not found: {schema_path}") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"policy output.json_schema_file {schema_path} is not valid JSON: {exc}") from None
        output_cfg = _section({"output": output_data}, "output", OutputPolicy)
        return cls(input=input_cfg, output=output_cfg, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"policy file not found: {path}") from None
        import yaml

        try:
            # YAML is a superset of JSON, but a .json file gets JSON's stricter parser and messages.
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"policy file {path} could not be parsed: {exc}") from None
        return cls.from_dict(data or {}, base_dir=path.parent, source=str(path))

    # ------------------------------------------------------------------ input checks
    def check_input(self, texts: list[str], roles: list[str] | None = None) -> None:
        """Raise ``PolicyViolation`` if the prompt texts (and chat roles) break an input rule."""
        rules = self.input
        if roles is not None:
            for role in roles:
                if role not in rules.allowed_roles:
                    raise PolicyViolation("input_role", f"role {role!r} is not allowed by the server policy "
                                                        f"(allowed: {', '.join(rules.allowed_roles)})")
        total = sum(len(t) for t in texts)
        if rules.max_chars is not None and total > rules.max_chars:
            raise PolicyViolation("input_max_chars", f"input has {total} characters; the server policy allows "
                                                     f"at most {rules.max_chars}")
        for pattern in rules._compiled:
            for text in texts:
                if pattern.search(text):
                    raise PolicyViolation("input_blocked_pattern",
                                          "input matches a pattern blocked by the server policy")

    def check_prompt_tokens(self, num_tokens: int) -> None:
        limit = self.input.max_prompt_tokens
        if limit is not None and num_tokens > limit:
            raise PolicyViolation("input_max_tokens", f"prompt has {num_tokens} tokens; the server policy allows "
                                                      f"at most {limit}")

    # ------------------------------------------------------------------ output checks
    def output_filter(self) -> OutputFilter:
        return OutputFilter(self.output)

    @property
    def wants_json(self) -> bool:
        return self.output.json_schema is not None

    def validate_json(self, text: str) -> str | None:
        """None if ``text`` is JSON valid against the output schema, else a one-line reason."""
        import jsonschema

        if self.output.json_schema is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"output is not valid JSON ({exc.msg} at position {exc.pos})"
        error = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(self.output.json_schema)(self.output.json_schema).iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"output does not match the JSON schema at {where}: {error.message}"


class OutputFilter:
    """Screens streamed text before it reaches a client.

    ``feed(delta)`` returns the text that is safe to send now.  The tail that
    could still grow into a blocked phrase is held back until the next delta
    (or ``finish()``), so a phrase split across tokens is still caught.  When a
    rule ends the answer, ``stopped`` turns True and ``finish_reason`` says why;
    the caller then aborts generation.
    """

    def __init__(self, rules: OutputPolicy):
        self.rules = rules
        self.pending = ""  # received, not yet released
        self.emitted_chars = 0
        self.stopped = False
        self.finish_reason: str | None = None  # "content_filter" | "length" | None
        self.violations: list[str] = []  # checks that fired, in order

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        out = []
        blocked = self.rules._blocked
        while blocked is not None:
            match = blocked.search(self.pending)
            if match is None:
                break
            self.violations.append("output_blocked_phrase")
            self.finish_reason = "content_filter"
            out.append(self.pending[:match.start()])
            self.pending = self.pending[match.end():]
            if self.rules.blocked_action == "stop":
                self.pending = ""
                self.stopped = True
                break
            out.append(self.rules.redaction)
        if not self.stopped:
            keep = self._held_back_len(self.pending)
            out.append(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
        return self._cap("".join(out))

    def finish(self) -> str:
        """Release what was held back (the answer is over)."""
        if self.stopped:
            return ""
        rest, self.pending = self.pending, ""
        return self._cap(rest)

    def _held_back_len(self, text: str) -> int:
        # Longest suffix of the text that is a proper prefix of some blocked phrase.
        prefixes = self.rules._prefixes
        if not prefixes:
            return 0
        tail = text if self.rules.case_sensitive else text.lower()
        longest = max(len(p) for p in prefixes) - 1
        for size in range(min(longest, len(tail)), 0, -1):
            suffix = tail[-size:]
            if any(p.startswith(suffix) for p in prefixes):
                return size
        return 0

    def _cap(self, text: str) -> str:
        limit = self.rules.max_chars
        if limit is not None and self.emitted_chars + len(text) > limit:
            text = text[:limit - self.emitted_chars]
            self.violations.append("output_max_chars")
            self.finish_reason = "length"
            self.stopped = True
            self.pending = ""
        self.emitted_chars += len(text)
        return text


# ---------------------------------------------------------------------- helpers
def _section(data: dict[str, Any], name: str, cls: type) -> Any:
    values = data.get(name) or {}
    if not isinstance(values, dict):
        raise TypeError(f"policy section {name!r} must be a mapping")
    known = set(cls.__dataclass_fields__)
    if name == "output":
        known.add("json_schema_file")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"policy {name}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def _check_positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"policy {name} must be a positive integer or null, got {value!r}")


def _check_str_list(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"policy {name} must be a list of strings, got {value!r}")
