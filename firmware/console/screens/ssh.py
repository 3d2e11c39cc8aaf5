"""The SSH access screen: enable with one public key, or disable."""

from __future__ import annotations

from ..base import ESC, ConsoleBase


class SshScreen(ConsoleBase):
    """SSH access kept on the config partition."""

    def ssh_screen(self) -> None:
        from ...ssh_access import SshSetupError, disable, enable, state

        while True:
            self.frame("SSH access", "e: enable with a public key   d: disable   Esc: back")
            if self.s.ssh_dir is None:
                self.put(2, 2, "SSH cannot be set up here (no config partition given).")
            else:
                st = state(self.s.ssh_dir)
                self.put(2, 2, "SSH is " + ("ON" if st.enabled else "OFF") +
                         (f", {st.authorized_keys} authorized key(s)" if st.enabled else ""))
                self.put(3, 2, f"Host key  {st.host_key_fingerprint or 'none yet'}")
                self.put(5, 2, "Public keys only, no passwords. Log in as root with the key.")
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if self.s.ssh_dir is None or k not in (ord("e"), ord("d")):
                continue
            if k == ord("d") and not self.confirm("Really turn SSH off?"):
                self.say("Cancelled.")
                continue
            if not self.unlock():
                continue
            from ...config.mount import RemountHook

            remount = RemountHook(str(self.s.ssh_dir / "ssh"))
            try:
                if k == ord("d"):
                    st = disable(self.s.ssh_dir, remount=remount, runner=self.s.ssh_runner)
                    self.say(st.describe() + ".")
                    continue
                self.frame("SSH access", "Enter: enable   Esc: cancel")
                self.put(2, 2, "Paste one public key (ssh-ed25519 AAAA... comment):")
                text = self.edit_line(4, 2, width=min(76, self.w - 3))
                if text is None:
                    self.say("Cancelled: nothing changed.")
                    continue
                st = enable(self.s.ssh_dir, text, remount=remount, runner=self.s.ssh_runner)
                self.say(f"SSH on. Host key {st.host_key_fingerprint}")
            except SshSetupError as e:
                self.say(f"Refused: {e}. Nothing changed.")
