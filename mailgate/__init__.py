"""
mailgate: a Twisted-native edge mail gateway.

Embedding: ``Gateway.from_config("mailgate.ini", reactor=reactor)`` returns a Twisted service;
start it (or add it to your application) and the listeners accept mail.
"""

from mailgate.version import __version__


class Gateway:
    """The documented entry point for running mailgate inside another Twisted program."""

    @staticmethod
    def from_config(path_or_config, reactor=None, **kwargs):
        """
        A twisted.application.service.IService for the configuration at path_or_config (a path
        or a mailgate.config.Config).  Raises mailgate.errors.ConfigError, whose str() is the
        one-line message to show.  kwargs go to mailgate.service.build_service.
        """
        from mailgate.config import Config, load_config
        from mailgate.service import build_service

        if reactor is None:
            from twisted.internet import reactor
        config = path_or_config if isinstance(path_or_config, Config) else load_config(path_or_config)
        return build_service(config, reactor, **kwargs)


__all__ = ["Gateway", "__version__"]
