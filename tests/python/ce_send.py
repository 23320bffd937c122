"""Sends CloudEvents in binary content mode with the CloudEvents SDK, as Knative, Dapr, Argo
Events or any SDK user would: over HTTP to the gateway, or over AMQP straight to RabbitMQ.

    ce_send.py http URL TOKEN EVENTS
    ce_send.py amqp AMQP_URL EXCHANGE PREFIX EVENTS

EVENTS is a JSON list of {"attributes": {...}, "data": {...}}. PREFIX is the application
property prefix: `cloudEvents_` (the SDK's AMQP binding), `cloudEvents:` (the same properties
under the binding's other prefix) or `ce-` (the SDK's RabbitMQ binding). Prints one JSON line
per event: {"id", "status", "body"} over HTTP, {"id", "published"} over AMQP.
"""

import json
import sys
import urllib.error
import urllib.request

from cloudevents.core.bindings import amqp, http, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def events(raw):
    for item in json.loads(raw):
        attributes = dict(item["attributes"])
        attributes.setdefault("datacontenttype", "application/json")
        yield CloudEvent(attributes=attributes, data=item.get("data"))


def send_http(url, token, raw):
    for event in events(raw):
        message = http.to_binary(event, JSONFormat())
        headers = dict(message.headers)
        headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, data=message.body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        print(json.dumps({"id": event.get_id(), "status": status, "body": json.loads(body or b"null")}))


def send_amqp(url, exchange, prefix, raw):
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for event in events(raw):
        if prefix == "ce-":
            message = rabbitmq.to_binary(event, JSONFormat())
            headers, content_type, body = message.headers, message.content_type, message.body
        else:
            message = amqp.to_binary(event, JSONFormat())
            headers = {
                prefix + name[len(amqp.CE_PREFIX_UNDERSCORE):]: value
                for name, value in message.application_properties.items()
            }
            content_type = message.properties.get(amqp.CONTENT_TYPE_PROPERTY)
            body = message.application_data
        properties = pika.BasicProperties(
            content_type=content_type, headers=headers, delivery_mode=2
        )
        channel.basic_publish(exchange, event.get_type(), body, properties, mandatory=True)
        print(json.dumps({"id": event.get_id(), "published": True}))
    connection.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "http":
        send_http(*sys.argv[2:5])
    elif mode == "amqp":
        send_amqp(*sys.argv[2:6])
    else:
        sys.exit(f"unknown mode {mode!r}: http or amqp")
