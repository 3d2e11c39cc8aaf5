"""The admin password screen, and setting the password (also on first start)."""

from __future__ import annotations

import time

from ...config import ConfigError, ConfigStoreError
from ..base import ConsoleBase


class PasswordScreen(ConsoleBase):
    """Changing the admin password."""

    def set_password(self, first: bool = False) -> bool:
        title = "set admin password" if first else "admin password"
        while True:
            new = self.ask_password(title, "New admin password:")
            if new is None:
                if first:
                    self.say("An admin password is needed before anything else.")
                    continue
                self.say("Cancelled: nothing changed.")
                return False
            self.put(5, 2, "Repeat it:")
            again = self.edit_line(5, 2 + len("New admin password:") + 1, secret=True,
                                   width=34)
            if again is None:
                continue
            if again != new:
                self.say("The two entries differ: try again.")
                continue
            try:
                self.s.store.set_admin_password(new)
            except (ConfigError, ConfigStoreError) as e:
                self.say(f"Refused: {e}")
                continue
            self.unlocked_at = time.monotonic()
            self.say("Admin password saved.")
            return True

    def password_screen(self) -> None:
        cfg = self.config()
        if cfg is None:
            return
        if cfg["admin.password_hash"]:
            pw = self.ask_password("admin password", "Current password:")
            if pw is None or not self.login(cfg, pw):
                self.say("Wrong password: nothing changed." if pw is not None
                         else "Cancelled: nothing changed.")
                return
        self.set_password()
