"""The console's forms: each carries a CSRF token (Flask-WTF)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import HiddenField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Regexp, ValidationError

from .config import PERSON

# Seven digits in a row (spaces and dashes between them allowed) are more than
# any mask shows ("138****8000"): a full number or ID number pasted into a note.
_LONGEST_DIGIT_RUN = 6
_SEPARATORS = frozenset(" -\u00a0\u3000")


def longest_digit_run(text: str) -> int:
    """The most decimal digits (any script's, full-width too) in a row in `text`."""
    longest = run = 0
    for char in text:
        if char.isdecimal():
            run += 1
            longest = max(longest, run)
        elif char not in _SEPARATORS:
            run = 0
    return longest


class NoFullNumbers:
    """Refuses a text that holds a full phone number or ID number."""

    def __call__(self, form: FlaskForm, field: StringField) -> None:
        if field.data and longest_digit_run(field.data) > _LONGEST_DIGIT_RUN:
            raise ValidationError(
                "Write no full phone number or ID number in a note: use the masked form."
            )


class ApproveForm(FlaskForm):
    note = TextAreaField(
        "Note (optional)",
        validators=[Length(max=500, message="At most 500 characters."), NoFullNumbers()],
    )


class RejectForm(FlaskForm):
    note = TextAreaField(
        "Why is the change refused? (required)",
        validators=[
            DataRequired(message="The note is required."),
            Length(max=500, message="At most 500 characters."),
            NoFullNumbers(),
        ],
    )


class SignInForm(FlaskForm):
    """Development only: sign in as whoever is named."""

    person = StringField(
        "Your name",
        validators=[
            DataRequired(message="Use 1-64 of the letters A-Z a-z, digits and . _ @ -"),
            Regexp(
                PERSON.pattern + "$",
                message="Use 1-64 of the letters A-Z a-z, digits and . _ @ -",
            ),
        ],
    )


class LanguageForm(FlaskForm):
    language = HiddenField()
    next = HiddenField()


class SignOutForm(FlaskForm):
    pass
