"""A failure alert: a Prefect automation that sends a notification when a tokenmill flow run fails or crashes.

The notification goes through a notification block the operator creates once (Slack webhook, e-mail,
Microsoft Teams, a custom webhook …, see docs/operations.md); ``register_failure_alert`` points the one
``tokenmill: run failed or crashed`` automation at it, creating or updating it (idempotent).
The automation matches the ``tokenmill`` tag every deployment carries, so scheduled and manual runs alike alert.
"""

from __future__ import annotations

from uuid import UUID

AUTOMATION_NAME = "tokenmill: run failed or crashed"
ALERT_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
SUBJECT = "tokenmill: {{ flow_run.name }} {{ flow_run.state.name | lower }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }}{% if deployment %}/{{ deployment.name }}{% endif %} "
    "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "Open it: {{ flow_run | ui_url }}"
)


def notification_block_id(slug: str) -> UUID:
    """The document id of the notification block ``<block-type>/<name>`` (e.g. ``slack-webhook/ops``)."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import NotificationBlock

    if "/" not in slug:
        raise ValueError(f"{slug!r}: name a notification block as <block-type>/<name>, e.g. slack-webhook/ops")
    try:
        block = Block.load(slug)
    except ValueError as err:
        raise ValueError(f"no notification block {slug!r} on this server: create it first ({err})") from None
    if not isinstance(block, NotificationBlock):
        raise ValueError(f"block {slug!r} is a {type(block).__name__}, not a notification block")
    return block._block_document_id


WEBHOOK_BLOCK = "tokenmill-alerts"


def webhook_block(url: str) -> str:
    """Save (or update) a custom-webhook notification block that POSTs ``{"text": …, "subject": …}`` to ``url``
    (the shape Slack-compatible incoming webhooks take); return its ``<type>/<name>``."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="tokenmill", url=url, json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}"}
    )
    block.save(WEBHOOK_BLOCK, overwrite=True)
    return f"custom-webhook/{WEBHOOK_BLOCK}"


def register_failure_alert(target: str, tag: str = "tokenmill") -> UUID:
    """Create or update the automation that notifies ``target`` when a run tagged ``tag`` fails or crashes.

    ``target`` is a notification block ``<type>/<name>`` or an http(s) webhook URL (saved as a block first)."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_slug = webhook_block(target) if target.startswith(("http://", "https://")) else target
    automation = Automation(
        name=AUTOMATION_NAME,
        description=f"Notify {block_slug} when a flow run tagged {tag!r} ends Failed or Crashed.",
        trigger=EventTrigger(
            expect=set(ALERT_EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=notification_block_id(block_slug), subject=SUBJECT, body=BODY)],
    )
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is None:
        return automation.create().id
    automation.id = existing.id
    automation.update()
    return existing.id
