"""limits that act: fraud settings on accounts, notice delivery state, auto top-ups

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from callguard.books.database import table_options

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# MySQL/MariaDB's DATETIME drops the microseconds without fsp=6 (MySQL support came after
# this revision shipped: SQLite and PostgreSQL get the type they always had).
_AT = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')

_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    options = table_options(op.get_bind())  # MySQL/MariaDB: utf8mb4, byte for byte
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_calls_per_minute', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('max_spend_per_hour', sa.BigInteger(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('blocked_prefixes', sa.String(length=2000), nullable=False,
                                      server_default=''))
        batch_op.add_column(sa.Column('on_fraud', sa.String(length=8), nullable=False,
                                      server_default='notify'))
        batch_op.add_column(sa.Column('unblocked_at', _AT, nullable=True))
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        for name in ('mail_sent_at', 'webhook_sent_at', 'next_attempt_at', 'failed_at'):
            batch_op.add_column(sa.Column(name, _AT, nullable=True))
        batch_op.create_index('ix_notifications_due', ['sent_at', 'next_attempt_at'],
                              unique=False)
    op.create_table('auto_topups',
    sa.Column('id', _ID, nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('payment_method', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=10), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', _AT, nullable=True),
    sa.Column('provider_id', sa.String(length=200), nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('entry', _ID, nullable=True),
    sa.Column('created_at', _AT, nullable=False),
    sa.Column('done_at', _AT, nullable=True),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['entry'], ['ledger.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key'),
    **options,
    )
    with op.batch_alter_table('auto_topups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_auto_topups_account'), ['account'], unique=False)


def downgrade() -> None:
    op.drop_table('auto_topups')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_due')
        for name in ('failed_at', 'next_attempt_at', 'webhook_sent_at', 'mail_sent_at'):
            batch_op.drop_column(name)
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        for name in ('unblocked_at', 'on_fraud', 'blocked_prefixes', 'max_spend_per_hour',
                     'max_calls_per_minute'):
            batch_op.drop_column(name)
