"""Durable state that users create (runtime endpoints, batch jobs): one owner per kind, one store."""
