"""Model endpoints created, updated and deleted at runtime (`Model.create` etc.); see docs/endpoints.md."""
