"""USB gadget front end: configfs gadget, FunctionFS endpoints, Bulk-Only Transport."""
